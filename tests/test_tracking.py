"""MLflow conventions against a real SQLite store."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from newsray import tracking
from newsray.config import load_config
from newsray.tasks import get_task


@pytest.fixture
def cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(None, [f"tracking.run_dir={tmp_path / 'runs'}", f"data.root={data_dir}"])


def test_default_store_is_sqlite_at_an_absolute_path(cfg, tmp_path):
    uri = tracking.tracking_uri(cfg)
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # four slashes: absolute, valid from any Ray worker's cwd


def test_env_uri_wins(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/other.db"
    assert tracking.artifact_root(cfg) is not None


def test_run_records_config_data_hashes_and_commit(cfg, tmp_path):
    task = get_task(cfg)
    hashes = task.data_hashes()
    with tracking.start_run(cfg, run_name="t", stage="data", data_hashes=hashes) as run:
        mlflow.log_metric("x", 1.0)
    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name("newsray-news")
    assert exp is not None and exp.artifact_location.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    r = client.get_run(run.info.run_id)
    assert r.info.experiment_id == exp.experiment_id
    assert r.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert r.data.params["lora.target_modules"].startswith("['q_proj'")
    assert r.data.tags["newsray.stage"] == "data"
    assert r.data.tags["newsray.data_sha256.train"] == hashes["train"] and len(hashes["train"]) == 64
    commit = r.data.tags["newsray.git_commit"]
    assert commit == "unknown" or len(commit.split("+")[0]) == 40
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "learning_rate: " in text and "task: news" in text


def test_one_experiment_per_task(cfg, tmp_path):
    from newsray.config import load_config as lc

    ag = lc(None, [f"tracking.run_dir={tmp_path / 'runs'}", "data.task=agnews"])
    assert tracking.setup(cfg) != tracking.setup(ag)
    assert tracking.experiment_name(ag) == "newsray-agnews" and tracking.registered_model_name(ag) == "newsray-agnews"
    assert tracking.setup(cfg) == tracking.setup(cfg)  # reused, not duplicated


def test_a_second_store_in_the_same_process_is_not_captured_by_the_first(cfg, tmp_path, monkeypatch):
    other = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_dir": str(tmp_path / "other")})})
    tracking.setup(cfg)
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ
    assert tracking.tracking_uri(other) == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    tracking.setup(other)
    assert mlflow.get_tracking_uri() == tracking.tracking_uri(other)


def test_concurrent_writers_to_one_sqlite_store_lose_nothing(cfg, tmp_path):
    """What tune.max_concurrent_trials=2 on SQLite does to the store, for real: two trials' rank-0 workers logging every
    step (newsray's worker logger) while two trial drivers open runs, tag and log params, all in separate processes."""
    import subprocess
    import sys

    uri = tracking.tracking_uri(cfg)
    tracking.setup(cfg)  # the store exists before the writers start, as the search's driver creates it
    exp_id = mlflow.get_experiment_by_name(tracking.experiment_name(cfg)).experiment_id
    steps = 150
    worker = f"""
import sys, mlflow
from newsray.train.loop import _MlflowLogger
client = mlflow.MlflowClient({uri!r})
run = client.create_run({exp_id!r})
log = _MlflowLogger({{"tracking_uri": {uri!r}, "run_id": run.info.run_id}}, 0)
for step in range(1, {steps} + 1):
    log.log({{"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0}}, step)
    if sys.argv[1] == "driver" and step % 10 == 0:  # a trial driver's calls between the worker's
        client.set_tag(run.info.run_id, f"tag{{step}}", "x")
        client.log_param(run.info.run_id, f"p{{step}}", step)
print(run.info.run_id)
"""
    procs = [subprocess.Popen([sys.executable, "-c", worker, role], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("worker", "worker", "driver", "driver")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "not logged" not in err, err[-2000:]
    client = MlflowClient(uri)
    for out, _ in outs:
        run_id = out.strip().splitlines()[-1]
        assert len(client.get_metric_history(run_id, "loss")) == steps  # every step of every writer is in the store


def test_a_tracking_server_that_does_not_answer_is_one_sentence_in_seconds(cfg, tmp_path, monkeypatch):
    """Refused (nothing on the port) and silent (a socket that accepts connections and never answers): one sentence
    after PROBE_S, not MLflow's ~5 minutes of retries (measured with `newsray evaluate`: 4 min 42 s, then its
    exception). Any HTTP answer counts as a server: a plain HTTP server's 404 passes the check."""
    import http.server
    import socket
    import threading
    import time

    from newsray.errors import ConfigError

    monkeypatch.setattr(tracking, "PROBE_S", 2.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshakes; nobody reads or answers
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501/404 to all
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        for port, why in ((closed, "ConnectionError"), (silent.getsockname()[1], "ReadTimeout")):
            uri = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            with pytest.raises(ConfigError, match=rf"the MLflow tracking server at {uri} \(tracking.uri\) does not answer \({why} for 2 s\)"):
                tracking.setup(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})}))
            assert time.monotonic() - t0 < 15
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed}")
        with pytest.raises(ConfigError, match=r"\(\$MLFLOW_TRACKING_URI\) does not answer"):
            tracking.setup(cfg)
        tracking.check_server(f"http://127.0.0.1:{plain.server_address[1]}", "tracking.uri")  # answers: no error
    finally:
        plain.shutdown()
        silent.close()
