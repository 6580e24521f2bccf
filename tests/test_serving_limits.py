"""Serve under more load than it admits, live: 503 `overloaded` for what does not fit in the queue, 504 `timeout`
for what is not answered in serve.request_timeout_s, and the timed-out generations really cancelled (their
engine slot free again). One in-process app on the embedded base model, real HTTP over loopback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from newsray.config import load_config

from localcluster import free_port

pytestmark = pytest.mark.slow

LONG = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]  # far more than 256 tokens


def test_load_beyond_the_queue_is_503_overloaded_and_slow_answers_are_504_then_freed(embedded_model):
    from newsray.serving.app import run, shutdown

    timeout_s = 5
    # One replica with one engine slot, 2 requests in flight on it and 1 waiting for it: a 4th concurrent
    # request cannot be queued and is shed at once.
    cfg = load_config(None, [f"model.name={embedded_model.name}", "model.max_seq_length=512", "ray.num_cpus=2",
                             "ray.object_store_memory_mb=256", f"serve.port={free_port()}", "serve.max_batch_size=1",
                             "serve.max_ongoing_requests=2", "serve.max_queued_requests=1",
                             f"serve.request_timeout_s={timeout_s}", "serve.max_new_tokens=256"])
    url = run(cfg, "baseline", blocking=False)
    try:
        def chat(max_tokens: int, messages: list = LONG) -> requests.Response:
            return requests.post(f"{url}/v1/chat/completions", timeout=120,
                                 json={"model": "baseline", "messages": messages, "max_tokens": max_tokens})

        warm = chat(1, [{"role": "user", "content": "Hi"}])  # the replica is up and answers
        assert warm.status_code == 200, warm.text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: chat(256), range(8)))
        by_status: dict[int, list[requests.Response]] = {}
        for r in answers:
            by_status.setdefault(r.status_code, []).append(r)
        summary = {k: len(v) for k, v in by_status.items()}
        assert set(by_status) <= {200, 503, 504}, {k: v[0].text for k, v in by_status.items()}
        # 3 admitted (the slot, the engine's queue, the router's queue): none finishes 256 tokens in 5 s;
        # the other 5 are shed without waiting
        assert summary.get(503, 0) >= 4 and summary.get(504, 0) >= 1, summary
        for r in by_status[503]:
            assert r.json()["error"]["type"] == "overloaded" and r.headers["Retry-After"] == "5", r.text
        for r in by_status[504]:
            err = r.json()["error"]
            assert err["type"] == "timeout" and "serve.request_timeout_s" in err["message"], r.text

        # The timed-out generations were cancelled: the one slot is free at once. Had they gone on decoding
        # (about 256 tokens each), this request would wait behind them past the 5 s and be a 504 too.
        after = chat(2, [{"role": "user", "content": "Hi"}])
        assert after.status_code == 200, (summary, after.text)
    finally:
        shutdown(cfg)
