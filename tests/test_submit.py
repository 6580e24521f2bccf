"""A real Ray head on loopback (cluster/local.sh) and real jobs submitted through the Jobs SDK."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from newsray.errors import ConfigError, NewsrayError
from newsray.submit import parse_result, stages, submit

from localcluster import free_port, local_cluster

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`cluster/local.sh start` (a head only, 2 CPUs, no services) on free ports; stopped (this head only) at the end."""
    with local_cluster(tmp_path_factory.mktemp("cluster"), workers=0, services=False, head_cpus=2) as c:
        yield c.address, c.env


def test_stages_come_from_jobs_dir():
    assert "data" in stages()
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        submit("nope", None)


def test_unreachable_cluster_is_one_sentence(data_dir):
    port = free_port()
    with pytest.raises(NewsrayError, match=f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}"):
        submit("data", None, [f"data.root={data_dir}"], address=f"http://127.0.0.1:{port}")


def test_parse_result_takes_the_last_marker():
    assert parse_result('x\nNEWSRAY_RESULT {"a": 1}\nNEWSRAY_RESULT {"a": 2}\nbye') == {"a": 2}
    assert parse_result("no marker") is None


@pytest.mark.slow
def test_submitted_job_runs_on_the_local_head_and_returns_its_result(head, tmp_path, data_dir, monkeypatch):
    address, env = head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs: list[str] = []
    res = submit("data", REPO / "configs" / "news-smollm2-135m-cpu.yaml",
                 [f"data.root={data_dir}", f"tracking.run_dir={tmp_path}"], address=address, log=logs.append)
    assert res.status == "SUCCEEDED", "".join(logs)[-3000:]
    assert res.result["splits"]["test"]["n"] == 96
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(res.result["mlflow_run_id"])
    assert run.data.tags["newsray.stage"] == "data"
    # The Ray CLI agrees on the auth mode (token) and sees the job.
    r = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "status", "--address", address, res.job_id],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert r.returncode == 0 and "succeeded" in (r.stdout + r.stderr).lower()


@pytest.mark.slow
def test_failed_job_is_reported_by_the_cli(head, tmp_path):
    address, env = head
    cli = str(Path(sys.executable).with_name("newsray"))
    # a data root that exists on the client but holds no data: refused before submission
    r = subprocess.run([cli, "submit", "data", "--address", address, f"data.root={tmp_path}"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_submitted_training_job_finishes_and_its_adapter_is_found(head, tmp_path, data_dir, monkeypatch):
    address, env = head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs: list[str] = []
    res = submit("train", None, ["data.task=agnews", f"data.root={data_dir}", "data.train_rows=[100,102]",
                                 "model.max_seq_length=512", "train.max_steps=2", "train.per_device_batch_size=2",
                                 "train.cpus_per_worker=1", "train.checkpoint_every_steps=2", "train.precision=fp32",
                                 f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}"],
                 address=address, log=logs.append)
    assert res.status == "SUCCEEDED", "".join(logs)[-4000:]
    adapter = Path(res.result["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "newsray_config.yaml").is_file()
    assert res.result["adapter_uri"] == f"runs:/{res.result['mlflow_run_id']}/adapter"
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    assert "adapter/adapter_config.json" in [a.path for a in client.list_artifacts(res.result["mlflow_run_id"], "adapter")]


@pytest.mark.slow
@pytest.mark.parametrize(("auth_env", "match"), [
    ({"RAY_AUTH_MODE": "disabled"}, "requires a token and got none (HTTP 401)"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "refused this machine's token (HTTP 403)"),
])
def test_a_submission_without_the_right_token_is_one_sentence(head, tmp_path, data_dir, auth_env, match):
    """The real token-auth head: no token, and a wrong one (Ray's SDK takes $RAY_AUTH_TOKEN over ~/.ray/auth_token)."""
    address, _ = head
    cli = str(Path(sys.executable).with_name("newsray"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")} | auth_env
    r = subprocess.run([cli, "submit", "data", "--address", address, f"data.root={data_dir}", f"tracking.run_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=300, env=env, check=False)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert match in " ".join(r.stderr.split()) and lines[-1].startswith("error: "), r.stderr[-2000:]


@pytest.mark.slow
def test_the_head_lost_while_submit_follows_its_job_is_one_sentence(tmp_path, data_dir, monkeypatch):
    """A head of its own, killed (SIGKILL: `ray start`, its raylet, GCS, dashboard and the job's driver) as the job's
    first log line arrives: the log stream breaks, the job's status cannot be read, and once the head has not answered
    for LOST_CONTACT_S `submit` ends with one sentence naming the job and the commands to look it up; no traceback, no
    hang."""
    import threading

    import newsray.submit

    monkeypatch.setattr(newsray.submit, "LOST_CONTACT_S", 6.0)  # 60 s for users; the path is the same
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with local_cluster(tmp_path / "cluster", workers=0, services=False, head_cpus=2) as c:
        streamed: list[str] = []
        killer: list[threading.Thread] = []

        def log(text: str) -> None:
            streamed.append(text)
            if not killer and not text.startswith("submitted "):  # the stream is open: a line of the job's own output
                killer.append(threading.Thread(target=c.kill, args=("head",)))
                killer[0].start()

        with pytest.raises(NewsrayError) as err:
            submit("train", REPO / "configs" / "agnews-smollm2-135m-cpu.yaml",
                   [f"data.root={data_dir}", f"tracking.run_dir={tmp_path / 'runs'}", "data.train_rows=[100,104]", "train.max_steps=50"],
                   address=c.address, log=log)
        assert killer, "".join(streamed)[-2000:]  # the head was killed while the job ran (it did not end first)
        killer[0].join(timeout=60)
        job_id = streamed[0].split()[3]  # "submitted train as <id> to <address>"
        message = str(err.value)
        assert message.startswith(f"lost contact with the Ray Jobs API at {c.address}"), message
        assert f"job {job_id} may still be running: `ray job status {job_id} --address {c.address}`" in message, message
