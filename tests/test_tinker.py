"""The Tinker backend and `newsray tinker-server`: real HTTP on loopback, the official SDK, the embedded model.

The managed Tinker service cannot be reached from here; `newsray tinker-server` speaks its wire
protocol (the pinned SDK's own types and protobuf messages) and does the real work (PEFT LoRA on a Ray
actor, AdamW, sampling, checkpoints on disk), so every client-side path runs for real against it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from newsray.config import load_config

REPO = Path(__file__).resolve().parents[1]
KEY = "tml-newsray-test-key"
MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(embedded_model):
    """`newsray tinker-server` in its own process (its own in-process Ray), on a free loopback port."""
    tmp = Path(tempfile.mkdtemp(prefix="nrtk-", dir="/tmp"))  # short: Ray's AF_UNIX socket paths
    env = os.environ | {"TINKER_API_KEY": KEY, "RAY_TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - the server writes it for the whole module
    proc = subprocess.Popen([sys.executable, "-m", "newsray.cli", "tinker-server", "--port", "0", "--storage", str(tmp / "store"),
                             "--max-body-mb", "8"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    url = None
    deadline = time.time() + 240
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        if "listening on" in line:
            url = line.split("listening on ")[1].split()[0]
    if url is None:
        proc.kill()
        pytest.fail(f"tinker-server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
    yield {"url": url, "storage": tmp / "store", "log": tmp / "server.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _overrides(tmp_path: Path, data_dir: Path, url: str, *extra: str) -> list[str]:
    return ["data.task=agnews", f"data.root={data_dir}", "model.max_seq_length=512", "train.backend=tinker",
            f"tinker.base_url={url}", "train.learning_rate=1e-3", "train.warmup_steps=0", "train.lr_scheduler=constant",
            "train.per_device_batch_size=2", "lora.r=8", f"train.storage_path={tmp_path / 'ray'}",
            f"tracking.run_dir={tmp_path / 'runs'}", *extra]


def _datum(tok, text: str):
    from tinker import types

    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={
        "target_tokens": types.TensorData(data=ids[1:], dtype="int64", shape=[n]),
        "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n])})


def test_datum_weights_are_the_hf_labels_mask(data_dir, smollm2_tokenizer):
    """Same token ids as the hf backend; weights 1 exactly where the hf loss has a label (answer + end-of-turn)."""
    from newsray.formatting import IGNORE_INDEX, Formatter
    from newsray.tasks import get_task
    from newsray.train.backends.tinker import datum
    from newsray.train.data import tokenize_examples

    cfg = load_config(None, [f"data.root={data_dir}", "model.max_seq_length=1024"])
    data = tokenize_examples(cfg, get_task(cfg), smollm2_tokenizer)
    fmt = Formatter.for_tokenizer(smollm2_tokenizer, 1024)
    for row in data.train[:20]:
        d = datum(row)
        ids, labels = row["input_ids"], row["labels"]
        assert d.model_input.to_ints() == ids[:-1]
        assert list(d.loss_fn_inputs["target_tokens"].data) == ids[1:]
        weights = list(d.loss_fn_inputs["weights"].data)
        assert weights == [1.0 if lab != IGNORE_INDEX else 0.0 for lab in labels[1:]]  # the hf loss's mask, shifted
        first = weights.index(1.0)
        assert all(w == 1.0 for w in weights[first:])  # answer + end-of-turn, nothing after
        assert d.loss_fn_inputs["target_tokens"].data[-1] == fmt.eot_id  # the stop token is trained
        assert all(w == 0.0 for w in weights[:first]) and sum(weights) == len(ids) - labels.count(IGNORE_INDEX)


@pytest.mark.slow
def test_sdk_trains_samples_and_round_trips_weights(server, smollm2_tokenizer):
    import tinker
    from tinker import types

    sc = tinker.ServiceClient(base_url=server["url"], api_key=KEY)
    try:
        tc = sc.create_lora_training_client(base_model=MODEL, rank=8, seed=0, train_unembed=False).result()
        assert tc.get_info().lora_rank == 8
        d = _datum(smollm2_tokenizer, "Stocks rallied on Tuesday after the central bank held rates steady.")
        losses = []
        fb = tc.forward_backward([d], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        for _ in range(3):  # pipelined as the cookbook does: submit the next step before awaiting this one
            nxt_fb, nxt_opt = tc.forward_backward([d], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=1e-3))
            out, _ = fb.result(), opt.result()
            logprobs = out.loss_fn_outputs[0]["logprobs"].data
            assert len(logprobs) == len(d.model_input.to_ints())
            assert out.metrics["loss:sum"] == pytest.approx(-sum(logprobs), rel=1e-4)  # the service's loss: -sum(w * logprob)
            losses.append(out.metrics["loss:sum"])
            fb, opt = nxt_fb, nxt_opt
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
        assert losses[-1] < losses[0] * 0.8, losses

        state = tc.save_state("rt").result().path
        after = tc.forward([d], "cross_entropy").result().metrics["loss:sum"]
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        assert tc2.forward([d], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(after, rel=1e-5)

        sampler = sc.create_sampling_client(model_path=tc.save_weights_for_sampler("rt-sampler").result().path).result()
        prompt = types.ModelInput.from_ints(d.model_input.to_ints()[:6])
        greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
        a = sampler.sample(prompt, 2, greedy).result()
        assert len(a.sequences) == 2 and all(0 < len(s.tokens) <= 6 for s in a.sequences)
        assert a.sequences[0].tokens == a.sequences[1].tokens  # greedy is deterministic
        assert len(a.sequences[0].logprobs) == len(a.sequences[0].tokens)
        lp = sampler.compute_logprobs(prompt).result()
        assert len(lp) == 6 and all(x < 0 for x in lp[1:])
    finally:
        sc.close("success").result()


@pytest.mark.slow
def test_server_checks_key_body_and_endpoints(server):
    import httpx

    url = server["url"]
    assert httpx.get(f"{url}/api/v1/healthz").json() == {"status": "ok"}
    r = httpx.post(f"{url}/api/v1/create_session", json={})
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    h = {"X-API-Key": KEY}
    r = httpx.post(f"{url}/api/v1/create_session", headers=h, content=b"{not json")
    assert r.status_code == 400 and "create_session" in r.json()["detail"]
    r = httpx.post(f"{url}/api/v1/forward_backward", headers=h, json={"model_id": "x"})
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]
    r = httpx.post(f"{url}/api/v1/create_custom_loss", headers=h, json={})
    assert r.status_code == 404 and "POST /api/v1/create_custom_loss is not implemented" in r.json()["detail"]
    r = httpx.post(f"{url}/api/v1/retrieve_future", headers=h, json={"request_id": "req-nope"})
    assert r.status_code == 404
    r = httpx.post(f"{url}/api/v1/telemetry", headers=h, content=b"x" * (9 * 1024 * 1024))
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    r = httpx.post(f"{url}/api/v1/load_weights", headers=h, json={"path": "tinker://../weights/x", "optimizer": False,
                                                                   "model_id": "m", "seq_id": 1})
    assert r.status_code == 404


@pytest.mark.slow
def test_bad_inputs_are_one_sentence(server, tmp_path, data_dir, monkeypatch):
    from newsray.errors import ConfigError
    from newsray.train.backends.tinker import TinkerBackend

    monkeypatch.setenv("TINKER_API_KEY", "tml-wrong-key")
    with pytest.raises(ConfigError, match=r"refused the API key \(401\)"):
        TinkerBackend().preflight(load_config(None, _overrides(tmp_path, data_dir, server["url"])))
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    with pytest.raises(ConfigError, match=rf"does not offer 'meta-llama/Llama-3.2-1B'.*it offers: {MODEL}\."):
        TinkerBackend().preflight(load_config(None, _overrides(tmp_path, data_dir, server["url"], "tinker.base_model=meta-llama/Llama-3.2-1B")))
    dead = f"http://127.0.0.1:{_free_port()}"
    env = os.environ | {"TINKER_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "newsray.cli", "train", *_overrides(tmp_path, data_dir, dead)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and time.time() - t0 < 60
    assert f"cannot reach the Tinker service at {dead} within 5 s" in p.stderr and "Traceback" not in p.stderr
    monkeypatch.delenv("TINKER_API_KEY")
    with pytest.raises(ConfigError, match="needs an API key"):
        TinkerBackend().preflight(load_config(None, _overrides(tmp_path, data_dir, server["url"])))


@pytest.mark.slow
def test_newsray_train_resumes_and_the_adapter_evaluates(server, tmp_path, data_dir):
    """`newsray train train.backend=tinker` killed after its step-2 checkpoint, resumed to step 4, evaluated."""
    import mlflow

    from newsray.evaluate.pipeline import evaluate
    from newsray.train import train
    from newsray.train.checkpoint import is_adapter_dir

    ov = _overrides(tmp_path, data_dir, server["url"], "train.max_steps=4", "train.checkpoint_every_steps=2", "train.run_name=tk")
    marker = tmp_path / "killed"
    env = os.environ | {"TINKER_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "NEWSRAY_TEST_KILL_AFTER_STEP": f"2:{marker}"}
    p = subprocess.run([sys.executable, "-m", "newsray.cli", "train", *ov], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    run_dir = tmp_path / "ray" / "tk"
    saved = json.loads((run_dir / "tinker_checkpoint_000002" / "tinker_state.json").read_text())
    assert saved["step"] == 2 and saved["state_path"].startswith("tinker://") and not list(run_dir.glob("checkpoint_*"))

    os.environ["TINKER_API_KEY"] = KEY
    try:
        result = train(load_config(None, [*ov, "train.resume=true"]))
    finally:
        os.environ.pop("TINKER_API_KEY")
    assert is_adapter_dir(result.adapter_dir) and result.adapter_dir.name == "checkpoint_000004"
    state = json.loads((result.adapter_dir / "trainer_state.json").read_text())
    assert state["backend"] == "tinker" and state["resumed_from_steps"] == [2] and state["global_step"] == 4
    assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4]
    adapter_cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                              "up_proj", "down_proj"}
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    steps = {m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")}
    assert steps == {3, 4} and client.get_metric_history(result.mlflow_run_id, "resumed_from_step")[0].value == 2
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["derived.learning_rate"] == "0.001" and run.data.tags["newsray.learning_rate_source"] == "config"
    assert KEY not in json.dumps(run.data.params) + json.dumps(run.data.tags)  # the key is never logged
    for key in ("lr", "tokens_per_s"):
        assert all(m.value > 0 for m in client.get_metric_history(result.mlflow_run_id, key))

    cfg = load_config(None, [*ov, "eval.limit=2", "eval.max_new_tokens=8", "eval.batch_size=2", "ray.num_cpus=2",
                             "ray.object_store_memory_mb=256", "eval.cpus_per_actor=1"])
    res = evaluate(cfg, result.adapter_uri, tmp_path / "eval")  # from the MLflow artefact, as `newsray evaluate -m runs:/...`
    assert res.aggregates["n"] == 2 and "accuracy" in res.aggregates

    from newsray.generation import load_generator
    from newsray.serving import served_spec

    spec = served_spec(str(result.adapter_dir), cfg, "cpu")  # what a Serve replica resolves and loads
    assert spec.adapter_dir == result.adapter_dir and spec.model.name == MODEL
    gen = load_generator(str(result.adapter_dir), cfg, spec=spec)
    (answer,) = gen.generate([[{"role": "user", "content": "Classify: Stocks rallied after the rate decision."}]], max_new_tokens=4)
    assert answer.n_new_tokens > 0 and answer.finish_reason in ("stop", "length", "json_end")


def test_learning_rate_default_from_the_cookbook(tmp_path, data_dir):
    """tinker-cookbook's get_lr where it knows the service model and the config sets no rate; else the config's."""
    from newsray.train.backends.tinker import default_learning_rate

    lr, source = default_learning_rate(load_config(None, ["tinker.base_model=meta-llama/Llama-3.2-1B"]))
    assert lr == pytest.approx(4.908e-4, rel=1e-3) and source == "tinker_cookbook.hyperparam_utils.get_lr"
    lr, source = default_learning_rate(load_config(None, ["tinker.base_model=meta-llama/Llama-3.2-1B", "train.learning_rate=3e-4"]))
    assert (lr, source) == (3e-4, "config")
    lr, source = default_learning_rate(load_config(None, ["tinker.base_model=meta-llama/Llama-3.2-1B", "train.learning_rate=3e-4",
                                                          "tinker.cookbook_lr=true"]))
    assert lr == pytest.approx(4.908e-4, rel=1e-3)
    lr, source = default_learning_rate(load_config(None, ["tinker.base_model=meta-llama/Llama-3.2-1B", "tinker.cookbook_lr=false"]))
    assert (lr, source) == (2e-4, "config")
    lr, source = default_learning_rate(load_config(None, []))  # SmolLM2: the cookbook has no formula for it
    assert lr == 2e-4 and source == "config (get_lr: ConfigurationError)"


@pytest.mark.slow
def test_cookbook_supervised_train_runs_against_the_server(server, tmp_path, data_dir, smollm2_tokenizer):
    """tinker-cookbook's own supervised `train.main` (local conversations file, role_colon renderer) against the server."""
    import asyncio

    from tinker_cookbook import tokenizer_utils
    from tinker_cookbook.supervised import train as cookbook_train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    tokenizer_utils.register_tokenizer(MODEL, lambda: smollm2_tokenizer)  # offline: the local tokenizer, not the hub
    lines = (data_dir / "news" / "news_train_data.jsonl").read_text().splitlines()[:4]
    conv = tmp_path / "conversations.jsonl"
    conv.write_text("".join(json.dumps({"messages": json.loads(line)["messages"]}) + "\n" for line in lines))
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=MODEL, renderer_name="role_colon", max_length=1024, batch_size=2)
    cfg = cookbook_train.Config(log_path=str(tmp_path / "log"), model_name=MODEL, recipe_name="newsray_test", renderer_name="role_colon",
                                dataset_builder=FromConversationFileBuilder(file_path=str(conv), common_config=common),
                                learning_rate=1e-3, lora_rank=8, base_url=server["url"], save_every=0, eval_every=0,
                                infrequent_eval_every=0, max_steps=2)
    os.environ["TINKER_API_KEY"] = KEY
    try:
        asyncio.run(cookbook_train.main(cfg))
    finally:
        os.environ.pop("TINKER_API_KEY")
    metrics = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train_mean_nll" in m] == [0, 1]
    assert all(0 < m["train_mean_nll"] < 10 for m in metrics if "train_mean_nll" in m)
    final = json.loads((tmp_path / "log" / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["name"] == "final" and final["sampler_path"].startswith("tinker://") and final["state_path"].startswith("tinker://")


def test_protocol_round_trips_with_the_sdks_own_codecs():
    """The server decodes what the SDK encodes, and the SDK decodes what the server encodes (fwd/bwd, sample)."""
    import numpy as np
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import (
        deserialize_forward_backward_output,
        deserialize_sample_response,
    )

    from newsray.tinker import protocol as P

    d = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={
        "target_tokens": types.TensorData(data=[6, 7, 8], dtype="int64", shape=[3]),
        "weights": types.TensorData(data=[0.0, 1.0, 1.0], dtype="float32", shape=[3])})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(data=[d, d], loss_fn="cross_entropy"),
                                       model_id="m", seq_id=3)
    msg, datums = P.parse_forward_backward(forward_backward_request_to_proto(req).SerializeToString())
    assert (msg.model_id, msg.seq_id, len(datums)) == ("m", 3, 2)
    assert (datums[0].tokens, datums[0].target_tokens, datums[0].weights) == ([5, 6, 7], [6, 7, 8], [0.0, 1.0, 1.0])
    bad = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(data=[d], loss_fn="importance_sampling"),
                                       model_id="m", seq_id=1)
    with pytest.raises(P.ProtocolError, match="importance_sampling"):
        P.parse_forward_backward(forward_backward_request_to_proto(bad).SerializeToString())
    with pytest.raises(P.ProtocolError, match="not a tinker ForwardBackwardRequest"):
        P.parse_forward_backward(b"\xff\xff\xff")

    lp = [np.array([-1.0, -2.0, -3.0], np.float32), np.array([-0.5], np.float32)]
    out = deserialize_forward_backward_output(P.forward_backward_output(lp, [-x for x in lp], 6.5))
    assert out.metrics == {"loss:sum": 6.5} and len(out.loss_fn_outputs) == 2
    assert list(out.loss_fn_outputs[0]["logprobs"].data) == [-1.0, -2.0, -3.0] and out.loss_fn_outputs[1]["logprobs"].shape == [1]
    s = deserialize_sample_response(P.sample_output([{"tokens": [1, 2], "logprobs": [-0.1, -0.2], "stop_reason": "stop"}], None))
    assert s.sequences[0].tokens == [1, 2] and s.sequences[0].stop_reason == "stop"

    assert P.parse_tinker_path(P.tinker_path("s:train:0", "state", "step-2")) == ("s:train:0", "state", "step-2")
    with pytest.raises(P.ProtocolError):
        P.parse_tinker_path("tinker://run/weights/a/../../b")


def test_training_requests_run_in_seq_id_order(tmp_path):
    """Requests of one model that arrive out of order run in seq_id order; a repeated seq_id is the same future."""
    import asyncio

    from newsray.tinker.server import Settings, State, TrainModel

    async def scenario() -> list[int]:
        state = State(Settings({MODEL: MODEL}, tmp_path, None), actor=None)
        state.models["m"] = TrainModel("m", "s", MODEL, 8)
        ran: list[int] = []

        def call(i: int):
            async def run() -> int:
                ran.append(i)
                return i
            return run

        r3, r2 = state.submit_ordered("m", 3, call(3)), state.submit_ordered("m", 2, call(2))
        await asyncio.sleep(0.05)
        assert ran == []  # seq 1 has not arrived: nothing may run before it
        assert state.submit_ordered("m", 2, call(99)) == r2
        r1 = state.submit_ordered("m", 1, call(1))
        results = [await state.result(r) for r in (r1, r2, r3)]
        assert results == [("ok", 1), ("ok", 2), ("ok", 3)]
        return ran

    assert asyncio.run(scenario()) == [1, 2, 3]
