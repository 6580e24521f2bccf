"""`newsray pipeline` end to end on the tiniest budget: a 1-trial search scored by accuracy on the validation
split, the final training run, baseline and tuned evaluated on 2 test rows, the comparison, the registry and
one real HTTP request to Ray Serve, all under one MLflow parent run."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screen_of_a_terminal(cmd: list[str], env: dict[str, str], cwd: Path, timeout_s: float, cols: int = 160, rows: int = 50) -> tuple[int, list[str]]:
    """Run `cmd` in a pseudo-terminal (pexpect) and return (exit status, every line the terminal showed:
    its scrollback and final screen, as pyte's VT100 emulator renders the byte stream)."""
    import pexpect
    import pyte

    screen = pyte.HistoryScreen(cols, rows, history=100_000)
    stream = pyte.ByteStream(screen)
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=str(cwd), dimensions=(rows, cols), timeout=timeout_s)
    while True:
        try:
            stream.feed(child.read_nonblocking(65536, timeout=timeout_s))
        except pexpect.EOF:
            break
    child.close()
    lines = ["".join(ch.data for ch in (line[x] for x in range(cols))).rstrip() for line in screen.history.top]
    return child.exitstatus, lines + [line.rstrip() for line in screen.display]


def test_pipeline_smoke_as_a_person_sees_it(tmp_path, data_dir, embedded_model):
    """`newsray pipeline` in a real terminal: stage headers and bars, no raw log record; it crashes as serve
    starts (NEWSRAY_PIPELINE_FAIL_AT), `--resume` with another config is refused, `--resume` runs only serve in
    the same pipeline run: the result table and the answer as JSON on the screen; the logs in the log file;
    resuming the finished run is refused."""
    import os
    import re
    import subprocess
    import sys

    import mlflow

    from newsray.pipeline import FAIL_ENV
    from newsray.tasks.agnews import LABELS

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "NO_COLOR")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "TERM": "xterm-256color", "COLUMNS": "160",
            "LINES": "50", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    args = ["data.task=agnews", f"data.root={data_dir}", "data.train_rows=[100,106]", "data.val_fraction=0.34",
            "model.max_seq_length=512", "train.warmup_steps=0", "train.precision=fp32", "train.learning_rate=1e-3",
            f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}", "train.cpus_per_worker=1.5",
            "ray.num_cpus=2", "ray.object_store_memory_mb=256",
            "tune.objective=accuracy", "tune.objective_limit=2", "tune.lora_r=[4]", "tune.batch_size=[2]", "tune.asha_grace_period=2",
            "tune.cpus_per_trial=1.5", "pipeline.num_samples=1", "pipeline.max_steps_per_trial=2", "pipeline.train_max_steps=2",
            "pipeline.eval_limit=2", "eval.max_new_tokens=8", "eval.batch_size=2", "eval.bootstrap_resamples=1000",
            f"serve.port={port}", "serve.max_new_tokens=8", "serve.cpus_per_replica=1"]
    cli = [str(Path(sys.executable).with_name("newsray")), "pipeline", *args]
    status, lines = _screen_of_a_terminal(cli, env | {FAIL_ENV: "serve"}, tmp_path, 1500)
    screen = "\n".join(lines)
    assert status == 1 and "crashed as stage 'serve' started" in screen, screen[-4000:]
    for stage in ("1/8 tune", "2/8 train", "3/8 objective", "4/8 evaluate baseline", "5/8 evaluate tuned", "6/8 compare", "7/8 register"):
        assert stage in screen, screen[-4000:]
    # the bars, finished: trials, training steps, generated rows
    assert re.search(r"tune .* 1/1 trials", screen) and re.search(r"train .* 2/2 steps", screen), screen[-4000:]
    assert len(re.findall(r"generate .* 2/2 rows", screen)) == 3, screen[-4000:]  # the objective on val, baseline and tuned on test
    # no raw log record on the screen: Ray's worker-log prefixes, logging's levels, Tune's status table, MLflow's links
    raw = [line for line in lines if re.search(r"\((\w+) pid=\d+|\b(INFO|WARNING|DEBUG)\b|Trial status:|View run |Traceback", line)]
    assert not raw, raw[:10]
    (log,) = (tmp_path / "runs" / "logs").glob("pipeline-*.log")
    assert f"logs: {log}" in screen.replace("\n", "")
    text = log.read_text(errors="replace")
    assert "Trial status:" in text and "pid=" in text, text[-3000:]  # what the screen no longer shows went here

    plain = {k: v for k, v in env.items() if k not in ("TERM", "COLUMNS", "LINES")}
    other = subprocess.run([*cli, "--resume", "eval.max_new_tokens=9"], capture_output=True, text=True, env=plain, cwd=tmp_path,
                           timeout=300, check=False)
    assert other.returncode == 2 and "ran another config (eval.max_new_tokens='8' there, '9' now)" in other.stderr, other.stderr[-2000:]
    status, lines = _screen_of_a_terminal([*cli, "--resume"], env, tmp_path, 900)
    screen = "\n".join(lines)
    assert status == 0, screen[-4000:]
    for name in ("tune", "train", "objective", "evaluate baseline", "evaluate tuned", "compare", "register"):
        assert f"{name}: done in pipeline run" in screen, screen[-4000:]  # recorded: not run again
    assert "8/8 serve" in screen and "newsray pipeline: done in" in screen and "models:/newsray-agnews/1" in screen
    assert re.search(r'"label": "(' + "|".join(LABELS) + ')"', screen), screen[-2000:]  # the answer, as formatted JSON

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("newsray-agnews")
    (pipe,) = client.search_runs([exp.experiment_id], filter_string="tags.`newsray.stage` = 'pipeline'")
    assert pipe.info.status == "FINISHED"
    result = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=pipe.info.run_id, artifact_path="pipeline_result.json",
                                                                 tracking_uri=client.tracking_uri)).read_text())
    assert result["endpoint"] == f"http://127.0.0.1:{port}" and result["answer"]["label"] in LABELS
    assert result["registered"] == "models:/newsray-agnews/1" and result["champion_moved"] is True
    assert result["objective"] == "accuracy" and 0.0 <= result["objective_value"] <= 1.0
    assert set(result["headline"]) == {"baseline", "tuned"} and "accuracy" in result["headline"]["tuned"]
    assert Path(result["report"]).is_file() and (Path(result["report"]).parent / "plots").is_dir()
    assert set(result["stage_s"]) == {"serve"}  # the resumed run ran only serve

    # Every stage's run is nested under the pipeline run; the trial's accuracy came from newsray.evaluate on the val split.
    nested = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pipe.info.run_id}'")
    stages = sorted(r.data.tags["newsray.stage"] for r in nested)
    assert stages == ["compare", "evaluate", "evaluate", "evaluate", "train", "tune"], stages  # + the final model's val objective
    splits = sorted(r.data.tags.get("newsray.split", "") for r in nested if r.data.tags["newsray.stage"] == "evaluate")
    assert splits == ["test", "test", "val"]
    (trial,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result['tune_run_id']}'")
    assert trial.info.status == "FINISHED" and 0.0 <= trial.data.metrics["final_accuracy"] <= 1.0
    (trial_eval,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
    assert trial_eval.data.tags["newsray.split"] == "val" and trial_eval.data.metrics["n"] == 2
    train_run = client.get_run(result["train_run_id"])
    assert train_run.data.params["lora.r"] == "4" and train_run.data.params["train.max_steps"] == "2"
    assert client.get_model_version_by_alias("newsray-agnews", "champion").run_id == result["train_run_id"]

    with pytest.raises(OSError):  # Serve was stopped after its one request
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    again = subprocess.run([*cli, "--resume"], capture_output=True, text=True, env=plain, cwd=tmp_path, timeout=300, check=False)
    assert again.returncode == 2 and f"({pipe.info.run_id}) finished" in again.stderr and "Traceback" not in again.stderr


def test_the_pipeline_request_refused_silent_or_not_json_is_one_sentence(tmp_path):
    """newsray.pipeline.ask against real loopback sockets: refused, accepted but silent, an answer that is not JSON."""
    import http.server
    import threading

    from newsray.config import load_config
    from newsray.errors import ModelError
    from newsray.pipeline import ask

    cfg = load_config(None, ["data.task=agnews"])
    with pytest.raises(ModelError, match="cannot be reached") as info:
        ask(cfg, f"http://127.0.0.1:{free_port()}", timeout_s=5)
    assert "\n" not in str(info.value)
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(ModelError, match="gave no answer within 1 s"):
            ask(cfg, f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1)

    class Html(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>a proxy page</html>")

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ModelError, match="not JSON"):
            ask(cfg, f"http://127.0.0.1:{srv.server_port}", timeout_s=10)
    finally:
        srv.shutdown()


def test_a_pipeline_failing_its_checks_leaves_no_run(tmp_path, data_dir, embedded_model):
    """A setting the search refuses (a GPU optimizer on CPU) ends in one sentence before any MLflow run is opened."""
    import os
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([sys.executable, "-m", "newsray.cli", "pipeline", "data.task=agnews", f"data.root={data_dir}", "data.val_fraction=0.1",
                        "train.optimizer=adamw_8bit", f"tracking.run_dir={tmp_path / 'runs'}", f"serve.port={free_port()}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "bitsandbytes GPU optimizer" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    exps = mlflow.MlflowClient(uri).search_experiments() if (tmp_path / "runs" / "mlflow.db").exists() else []
    assert not [run for e in exps for run in mlflow.MlflowClient(uri).search_runs([e.experiment_id])]  # no empty FAILED run
