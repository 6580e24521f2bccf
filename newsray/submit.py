"""Ray job submission: `newsray submit STAGE` through the Jobs SDK, and the jobs/ entrypoint helper.

A submitted job runs `python jobs/<stage>.py --config <file> [overrides]` on the cluster. Its
runtime_env carries the entrypoint and the config (working_dir) and the newsray package itself
(py_modules), so the cluster needs only newsray's dependencies installed, not newsray. The job
prints one `NEWSRAY_RESULT {json}` line that `submit` returns as the job's result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import newsray
from newsray.config import Config, load_config
from newsray.errors import ConfigError, NewsrayError
from newsray.raycluster import worker_env

RESULT_MARKER = "NEWSRAY_RESULT "
JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class SubmitResult:
    """What a submitted job came to."""

    job_id: str
    status: str
    result: dict[str, Any] | None
    address: str


def stages() -> list[str]:
    """Stages that have a job entrypoint in jobs/."""
    return sorted(p.stem for p in JOBS_DIR.glob("*.py") if not p.stem.startswith("_"))


def _is_local(address: str) -> bool:
    return (urlparse(address if "://" in address else f"http://{address}").hostname or "") in _LOCAL_HOSTS


def _local_path_overrides(cfg: Config) -> list[str]:
    """Pin the client's resolved paths so a job on a local cluster reads and writes where the user looks."""
    from newsray.tasks import get_task
    from newsray.tasks.base import candidate_roots

    files = list(get_task(cfg).files().values())  # fails here, before submission, if the data is missing
    root = cfg.data.root or next((str(r) for r in candidate_roots(cfg.data) if all(f.is_relative_to(r) for f in files)), None)
    pinned = [f"tracking.run_dir={cfg.tracking.run_dir}", f"train.storage_path={cfg.train.storage_path}"]
    return pinned + ([f"data.root={root}"] if root else [])


def build_runtime_env(cfg: Config, stage: str, config_path: Path | None, staging: Path) -> tuple[dict, str]:
    """Stage jobs/<stage>.py and the config in `staging`; return (runtime_env, config arg)."""
    (staging / "jobs").mkdir(parents=True)
    shutil.copy(JOBS_DIR / f"{stage}.py", staging / "jobs" / f"{stage}.py")
    config_arg = ""
    if config_path is not None:
        (staging / "configs").mkdir()
        shutil.copy(config_path, staging / "configs" / config_path.name)
        config_arg = f"configs/{config_path.name}"
    env = worker_env({"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", cfg.ray.auth_mode)})
    env.pop("RAY_ADDRESS", None)  # the job's driver joins the cluster it runs on
    runtime_env = {"working_dir": str(staging), "py_modules": [str(Path(newsray.__file__).parent)], "env_vars": env}
    return runtime_env, config_arg


def submit(stage: str, config_path: Path | None, overrides: list[str] | tuple[str, ...] = (), address: str | None = None,
           wait: bool = True, log: Callable[[str], None] = lambda s: print(s, end="", flush=True),
           job_args: list[str] | tuple[str, ...] = ()) -> SubmitResult:
    """Submit `jobs/<stage>.py` to the cluster at `address` ($RAY_ADDRESS, else the local head), stream its logs.

    `job_args` go to the entrypoint before the overrides (e.g. `--model runs:/ID/adapter` for evaluate).
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    if stage not in stages():
        raise ConfigError(f"unknown stage {stage!r}: the job entrypoints are {', '.join(stages())} (jobs/<stage>.py).")
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    cfg = load_config(config_path, list(overrides))  # bad config fails here, not on the cluster
    overrides = list(overrides) + (_local_path_overrides(cfg) if _is_local(address) else [])
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - the SDK raises ConnectionError/RuntimeError/ValueError
        if any(k in str(e) for k in ("status code 401", "status code 403", "authentication token")):
            raise NewsrayError(submit_failure(stage, address, e)) from None
        raise NewsrayError(f"cannot reach the Ray Jobs API at {address} ({str(e).splitlines()[0][:200]}); start a head with cluster/local.sh start or pass --address.") from None
    with tempfile.TemporaryDirectory(prefix="newsray-job-") as tmp:
        runtime_env, config_arg = build_runtime_env(cfg, stage, config_path, Path(tmp) / "job")
        args = list(job_args) + (["--config", config_arg] if config_arg else []) + list(overrides)
        entrypoint = " ".join(["python", f"jobs/{stage}.py", *map(_quote, args)])
        try:
            job_id = _submit_with_retry(client, entrypoint=entrypoint, runtime_env=runtime_env,
                                        metadata={"newsray.stage": stage, "newsray.version": newsray.__version__},
                                        entrypoint_num_cpus=0)  # the driver on the head (it may have 0 CPUs)
        except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError/ValueError/requests errors
            raise NewsrayError(submit_failure(stage, address, e)) from None
    log(f"submitted {stage} as {job_id} to {address}\n")
    if not wait:
        return SubmitResult(job_id, str(client.get_job_status(job_id)), None, address)

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            log(lines)

    try:
        asyncio.run(follow())
    except Exception as e:  # noqa: BLE001 - the log stream (a websocket) broke: follow the job by its status instead
        log(f"\nnewsray: the log stream of {job_id} broke ({type(e).__name__}); waiting for the job to end...\n")
    status = _wait_for_end(client, job_id, address)
    logs = _get_logs(client, job_id, address)
    return SubmitResult(job_id, str(status.value if isinstance(status, JobStatus) else status), parse_result(logs), address)


def submit_failure(stage: str, address: str, e: BaseException) -> str:
    """One sentence for a refused submission: auth (HTTP 401/403), files too large to upload, or the SDK's own message."""
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    token = "the cluster's token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH, or $RAY_AUTH_TOKEN) with RAY_AUTH_MODE=token"
    if "status code 401" in msg or "Missing authentication token" in msg:
        return f"the Ray Jobs API at {address} requires a token and got none (HTTP 401): put {token}."
    if "status code 403" in msg or "Invalid authentication token" in msg:
        return f"the Ray Jobs API at {address} refused this machine's token (HTTP 403): put {token}."
    if "exceeds the maximum size" in msg or "too large" in msg.lower():
        return f"the {stage} job's files are too large to upload to {address} ({msg}); keep data and weights out of the working dir (pass their paths or URIs)."
    return f"submitting the {stage} job to {address} failed: {msg}"


LOST_CONTACT_S = 60.0  # how long `submit` keeps asking a head that does not answer before it says so


def _wait_for_end(client: Any, job_id: str, address: str) -> Any:
    """The job's final status, polled (after the log stream ended or broke); one sentence once the head has not answered for
    LOST_CONTACT_S (a restarting head or a network blip in between is waited out)."""
    import time

    from ray.job_submission import JobStatus

    lost_since: float | None = None
    while True:
        try:
            status = client.get_job_status(job_id)
            lost_since = None
        except Exception as e:  # noqa: BLE001 - the head is unreachable for a moment, or gone
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= LOST_CONTACT_S:
                raise NewsrayError(f"lost contact with the Ray Jobs API at {address} ({type(e).__name__}); job {job_id} may still be "
                                   f"running: `ray job status {job_id} --address {address}` and `ray job logs {job_id} --address {address}`.") from None
            time.sleep(2)
            continue
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)


def _get_logs(client: Any, job_id: str, address: str) -> str:
    try:
        return client.get_job_logs(job_id)
    except Exception as e:  # noqa: BLE001
        raise NewsrayError(f"job {job_id} ended but its logs could not be read from {address} ({type(e).__name__}); "
                           f"`ray job logs {job_id} --address {address}`.") from None


def _submit_with_retry(client: Any, timeout_s: float = 90.0, **kwargs: Any) -> str:
    """submit_job, retrying while a freshly started head has no job agent yet."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def parse_result(logs: str) -> dict[str, Any] | None:
    """The last `NEWSRAY_RESULT {json}` line of a job's logs."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return None


def run_job(stage_fn: Callable[..., Any], argv: list[str] | None = None, takes_model: bool = False) -> None:
    """The body of every jobs/<stage>.py: parse --config (and --model) and overrides, run the stage, print its result."""
    import argparse

    parser = argparse.ArgumentParser(description=stage_fn.__doc__)
    parser.add_argument("--config", type=Path, default=None, help="A recipe YAML (configs/...).")
    if takes_model:
        parser.add_argument("--model", "-m", default="baseline", help="baseline, an adapter directory or an MLflow URI.")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides.")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = stage_fn(cfg, args.model) if takes_model else stage_fn(cfg)
    except NewsrayError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    payload = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    print(RESULT_MARKER + json.dumps(payload, default=str), flush=True)
