"""MLflow conventions: where runs go, one experiment per task, and what every run records."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import newsray  # noqa: F401  (sets MLFLOW_DISABLE_TELEMETRY before mlflow is imported)
from newsray.config import Config
from newsray.errors import ConfigError

MAX_PARAM_CHARS = 6000
PROBE_S = 10.0  # how long a tracking server that does not answer is waited for (MLflow's own retries take ~5 min)


def tracking_uri(cfg: Config) -> str:
    """$MLFLOW_TRACKING_URI, else tracking.uri, else SQLite at an absolute path in the run directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:
        return uri
    run_dir = Path(cfg.tracking.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def artifact_root(cfg: Config) -> str | None:
    """Artefacts beside the SQLite store (None when a server decides)."""
    if not tracking_uri(cfg).startswith("sqlite:"):
        return None
    return (Path(cfg.tracking.run_dir).resolve() / "mlartifacts").as_uri()


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"newsray-{cfg.data.task}"


def registered_model_name(cfg: Config) -> str:
    return cfg.tracking.registered_model or f"newsray-{cfg.data.task}"


def use_store(uri: str) -> None:
    """Point MLflow's tracking and registry at `uri` without leaving it in the environment.

    mlflow.set_tracking_uri / set_registry_uri also export $MLFLOW_TRACKING_URI /
    $MLFLOW_REGISTRY_URI; undone here, or the next stage in this process (another config, another
    store) and every Ray worker started later would take that export for the user's choice.
    """
    import mlflow

    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def check_server(uri: str, source: str) -> None:
    """An http(s) tracking URI must answer within PROBE_S, else one sentence (not MLflow's ~5 minutes of retries and then
    its exception). Any HTTP answer counts (auth and TLS are MLflow's to judge); only refused, reset or silent fails."""
    import time

    import requests

    if not uri.startswith(("http://", "https://")):
        return
    deadline, why = time.monotonic() + PROBE_S, ""
    while True:
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=min(3.0, PROBE_S))
            return
        except requests.exceptions.SSLError:
            return
        except requests.RequestException as e:
            why = type(e).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(f"the MLflow tracking server at {uri} ({source}) does not answer ({why} for {PROBE_S:g} s): start it "
                              "(e.g. `mlflow server --host 127.0.0.1 --port 5000`, or cluster/local.sh start), or point "
                              "tracking.uri / $MLFLOW_TRACKING_URI at one that runs; unset both for the local SQLite store.")
        time.sleep(1.0)


def check_store(cfg: Config) -> str:
    """The stage's tracking URI, its server (if it is one) answering: a stage calls this before Ray starts, so an
    unreachable server costs seconds, not the stage's work."""
    uri = tracking_uri(cfg)
    check_server(uri, "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri")
    return uri


def setup(cfg: Config) -> str:
    """Point MLflow at the store and the task's experiment (created on first use); returns its id."""
    import mlflow

    use_store(check_store(cfg))
    name = experiment_name(cfg)
    exp = mlflow.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(name, artifact_location=artifact_root(cfg))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(path: Path | None = None) -> str:
    """HEAD of the repository holding the code (`+dirty` if modified), or 'unknown'."""
    where = path or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow params (flat keys, values as strings, cut to MLflow's length)."""
    return {k: (str(v) if not isinstance(v, str) else v)[:MAX_PARAM_CHARS] for k, v in cfg.flat().items()}


def log_run_context(cfg: Config, data_hashes: dict[str, str] | None = None) -> None:
    """Log the resolved config (params + YAML artefact), data file hashes and the git commit."""
    import mlflow

    mlflow.log_params(run_params(cfg))
    mlflow.log_text(cfg.to_yaml(), "config.yaml")
    tags: dict[str, Any] = {"newsray.task": cfg.data.task, "newsray.model": cfg.model.name, "newsray.git_commit": git_commit(), "newsray.version": newsray.__version__}
    for role, digest in (data_hashes or {}).items():
        tags[f"newsray.data_sha256.{role}"] = digest
    mlflow.set_tags(tags)


@contextmanager
def start_run(cfg: Config, run_name: str, stage: str, data_hashes: dict[str, str] | None = None, nested: bool = False) -> Iterator[Any]:
    """An MLflow run in the task's experiment with the full context already logged.

    Nested under the active run, if there is one (a pipeline's or a search's parent run).
    """
    import mlflow

    setup(cfg)
    nested = nested or mlflow.active_run() is not None
    with mlflow.start_run(run_name=run_name, nested=nested, tags={"newsray.stage": stage}) as run:
        log_run_context(cfg, data_hashes)
        yield run


@contextmanager
def resume_run(cfg: Config, run_id: str) -> Iterator[Any]:
    """Reopen an earlier run of the task's experiment (its context was logged when it started)."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_id=run_id) as run:
        yield run
