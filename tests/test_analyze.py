"""`newsray analyze` on real AG News rows with the embedded model: CSV in, JSONL / Parquet out, per-row errors as
data, and a run killed after its first batch that, started again, does only the rest (no item twice)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from newsray.tasks.agnews import LABELS

pytestmark = pytest.mark.slow
ARGS = ["data.task=agnews", "model.max_seq_length=512", "eval.max_new_tokens=6", "eval.constrained=true", "eval.batch_size=1",
        "eval.cpus_per_actor=1", "ray.num_cpus=2", "ray.object_store_memory_mb=256"]


def _items(data_dir: Path, path: Path, n: int) -> list[dict[str, str]]:
    with open(data_dir / "agnews" / "test.csv", encoding="utf-8", newline="") as f:
        rows = [{"title": r[1], "description": r[2]} for r, _ in zip(csv.reader(f), range(n))]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["title", "description"])
        w.writeheader()
        w.writerows(rows)
    return rows


def _cli(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"RAY_TMPDIR": tempfile.mkdtemp(prefix="nra", dir="/tmp"), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "newsray.cli", "analyze", *args, *ARGS, f"tracking.run_dir={tmp_path / 'runs'}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_analyze_csv_to_jsonl_and_parquet_with_errors_as_data(tmp_path, data_dir, embedded_model):
    import pyarrow.parquet as pq

    from newsray.analyze import analyze
    from newsray.config import load_config

    _items(data_dir, tmp_path / "in.csv", 4)
    with open(tmp_path / "in.csv", "a", encoding="utf-8", newline="") as f:  # a row without a description, a row too long
        csv.writer(f).writerows([["Only a title", ""], ["Long", "word " * 600]])
    cfg = load_config(None, [f"data.root={data_dir}", *ARGS, f"tracking.run_dir={tmp_path / 'runs'}"])
    res = analyze(cfg, str(tmp_path / "in.csv"), "baseline", str(tmp_path / "out.jsonl"))
    rows = _lines(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3", "4", "5"] and res.rows_written == 6 and res.rows_skipped == 0
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[i]["answer"] in LABELS and by_id[i]["valid"] and by_id[i]["error"] is None for i in "0123")  # constrained: a label
    assert by_id["4"]["answer"] in LABELS  # an empty description is still text: the title alone is classified
    assert "exceeds the model's 512-token window" in by_id["5"]["error"] and by_id["5"]["answer"] is None
    assert {r["model_ref"] for r in rows} == {"baseline"} and res.rows_failed == 1
    again = analyze(cfg, str(tmp_path / "in.csv"), "baseline", str(tmp_path / "out.jsonl"))
    assert again.rows_skipped == 6 and again.rows_written == 0 and len(_lines(tmp_path / "out.jsonl")) == 6  # nothing twice

    pres = analyze(cfg, str(tmp_path / "in.csv"), "baseline", str(tmp_path / "parts"))
    table = pq.read_table(tmp_path / "parts")
    assert sorted(table.column("id").to_pylist()) == sorted(by_id) and pres.rows_written == 6
    assert {json.loads(a) for a in table.column("answer").to_pylist() if a} == {by_id[i]["answer"] for i in "01234"}


def test_a_killed_run_started_again_does_only_the_rest(tmp_path, data_dir, embedded_model):
    n = 12  # one actor, 4 items per call (eval.batch_size=1): 3 batches, each written as soon as it is done
    _items(data_dir, tmp_path / "in.csv", n)
    out = tmp_path / "out.jsonl"
    args = [str(tmp_path / "in.csv"), "--model", "baseline", "--out", str(out), f"data.root={data_dir}",
            "eval.constrained=false", "eval.max_new_tokens=40"]  # prose to the budget: batches that take a while
    first = _cli(tmp_path, *args)
    deadline = time.monotonic() + 600
    while not _lines(out):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:] if first.poll() is not None else "timeout"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole in-process Ray with it
    first.wait(timeout=60)
    written = _lines(out)
    assert 1 <= len(written) < n, len(written)
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "11", "answer": "Wor')  # what a crash mid-write leaves: dropped and redone
    second = _cli(tmp_path, *args)
    log = second.communicate(timeout=900)[0]
    assert second.returncode == 0, log[-3000:]
    rows = _lines(out)
    assert sorted(int(r["id"]) for r in rows) == list(range(n)), [r["id"] for r in rows]  # each exactly once
    assert rows[: len(written)] == written and all(r["error"] is None and r["n_new_tokens"] > 0 for r in rows)
    assert f"analyzed {n - len(written)} item(s)" in log and f"({len(written)} already in the output" in log
