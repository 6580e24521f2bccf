"""The training stage: check everything, start a Ray Train TorchTrainer (V2), record the run in MLflow.

`train(cfg)` is the one entry point (CLI, jobs/train.py, tests, and later tune/bench call it).
Everything a user can get wrong is checked on the driver before Ray starts a worker; workers log
per-step metrics into the driver's MLflow run themselves (rank 0), so a crash loses nothing logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.console import progress, progress_enabled, warn
from newsray.errors import ConfigError, NewsrayError, cause, user_error
from newsray.train.checkpoint import TRAINING_STATE_FILE, TrainerState
from newsray.train.data import TrainData

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass
class TrainResult:
    """What a training run produced."""

    adapter_dir: Path  # local adapter directory (the final checkpoint)
    adapter_uri: str  # runs:/<run_id>/adapter, accepted by evaluate and serve
    mlflow_run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""  # the final Ray Train checkpoint (path or URI under storage_path)
    run_name: str = ""  # the Ray Train run name (pass it back with train.resume=true to continue)


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> Path:
    return Path(path.removeprefix("file://"))


def check_storage(cfg: Config) -> str:
    """Make sure storage_path is usable and the run name is fresh (or resumed on purpose); returns the name."""
    storage = cfg.train.storage_path
    name = cfg.train.run_name or f"{cfg.data.task}-{cfg.train.backend}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    if not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"train.run_name {name!r}: use letters, digits, '.', '_' and '-' only (max 128 characters).")
    if _is_uri(storage):
        import pyarrow.fs

        try:
            fs, base = pyarrow.fs.FileSystem.from_uri(storage)
            exists = fs.get_file_info(f"{base.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound
        except Exception as e:  # noqa: BLE001 - any filesystem error is a storage problem to report
            raise ConfigError(f"train.storage_path: cannot use {storage} ({type(e).__name__}: {e}); check the URI and its credentials.") from None
    else:
        root = _local(storage)
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".newsray-write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"train.storage_path: cannot write to {root} ({e.strerror or e}); choose a writable directory.") from None
        exists = (root / name).exists()
    if cfg.train.resume and not cfg.train.run_name:
        raise ConfigError("train.resume=true needs train.run_name: the name of the run to continue.")
    if exists and not cfg.train.resume:
        raise ConfigError(f"train.run_name {name!r} already exists under {storage}; set train.resume=true to continue it, "
                          "or choose another name (or none, for a fresh unique one).")
    if cfg.train.resume and not exists:
        raise ConfigError(f"train.resume=true but there is no run {name!r} under {storage} to continue.")
    return name


def preflight(cfg: Config) -> tuple[Config, TrainData]:
    """Every check that needs no worker: backend, hardware settings, storage, data, batch size."""
    from newsray.models import load_tokenizer
    from newsray.tasks import get_task
    from newsray.train.backends import get_backend
    from newsray.train.data import check_batch_fits, tokenize_examples
    from newsray.train.optim import check_precision_and_optimizer

    get_backend(cfg.train.backend).preflight(cfg)
    check_precision_and_optimizer(cfg)
    cfg = cfg.model_copy(deep=True)
    cfg.train.run_name = check_storage(cfg)
    data = tokenize_examples(cfg, get_task(cfg), load_tokenizer(cfg.model))
    check_batch_fits(cfg, data)
    return cfg, data


def check_resources(cfg: Config, in_process: bool) -> None:
    """The workers must fit in the Ray cluster (an in-process Ray would wait for them forever)."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": cfg.train.num_workers * cfg.train.cpus_per_worker, "GPU": float(cfg.train.num_workers if cfg.train.use_gpu else 0)}
    for res, amount in need.items():
        if amount > have.get(res, 0.0):
            msg = (f"train.num_workers={cfg.train.num_workers} x {res.lower()}s per worker needs {amount:g} {res} but the Ray "
                   f"cluster has {have.get(res, 0.0):g}; lower train.num_workers or train.cpus_per_worker, or use a bigger cluster.")
            if in_process:
                raise ConfigError(msg)
            warn(f"{msg} (waiting for the autoscaler, if any)")


def _start_timeout_error(exc: BaseException, cfg: Config, latest: str | None) -> NewsrayError | None:
    """Ray Train gave up starting the worker group (train.worker_start_retries spent): one sentence."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if cause(exc, WorkerGroupStartupTimeoutError) is None:
        return None
    return NewsrayError(
        f"Ray Train could not start {cfg.train.num_workers} worker(s) of {cfg.train.cpus_per_worker:g} CPU in "
        f"{cfg.train.worker_start_retries + 1} tries (a node died and no node took its place?); the latest checkpoint is "
        f"{latest or 'none'}: add or restart a node, then run again with train.resume=true train.run_name={cfg.train.run_name}.")


def _log_adapter(adapter_dir: Path) -> None:
    """The adapter directory (without optimizer state) as MLflow artifacts under adapter/."""
    import mlflow

    for p in sorted(adapter_dir.iterdir()):
        if p.name == TRAINING_STATE_FILE:
            continue
        if p.is_dir():
            mlflow.log_artifacts(str(p), f"adapter/{p.name}")
        else:
            mlflow.log_artifact(str(p), "adapter")


def _latest_checkpoint(run_path: str) -> str | None:
    """The newest complete checkpoint a run left in storage (local or s3://..., even if Ray never registered it)."""
    from newsray.train.checkpoint import latest_complete

    found = latest_complete(run_path if _is_uri(run_path) else _local(run_path))
    return str(found) if found else None


def worker_config(cfg: Config, data: TrainData, mlflow: dict[str, str] | None = None) -> dict[str, Any]:
    """The train_loop_config every worker gets: the resolved config, token rows, steps, MLflow run.

    With train.resume, it also names the newest checkpoint on disk: a crash right after a report can
    leave a checkpoint that Ray never registered; the worker resumes from whichever is newer. For
    the same reason a restarted worker (FailureConfig) also looks in `run_dir` (local or object storage).
    """
    from newsray.train.data import total_steps
    from newsray.train.loop import KILL_ENV

    run_path = f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.run_name}"
    resume_dir = _latest_checkpoint(run_path) if cfg.train.resume else None
    return {"cfg": cfg.model_dump(mode="json"), "max_steps": total_steps(cfg, len(data.train)), "pad_id": data.pad_id,
            "train_rows": data.train, "val_rows": data.val, "kill_after_step": os.environ.get(KILL_ENV), "mlflow": mlflow,
            "resume_dir": resume_dir, "run_dir": run_path if _is_uri(run_path) else str(_local(run_path))}


def train_in_process(cfg: Config, out_dir: Path) -> tuple[dict[str, float], Path]:
    """The same loop in this process without Ray or MLflow (benchmarks: Ray's overhead); single worker only."""
    from newsray.train.loop import LocalSession, run_worker

    if cfg.train.num_workers != 1:
        raise ConfigError("train_in_process runs one worker; set train.num_workers=1.")
    cfg = cfg.model_copy(deep=True)
    cfg.train.storage_path = str(out_dir)
    cfg, data = preflight(cfg)
    import torch

    session = LocalSession(Path(out_dir) / (cfg.train.run_name or "local"))
    threads = torch.get_num_threads()
    try:
        last = run_worker(worker_config(cfg, data), session)
    finally:
        torch.set_num_threads(threads)  # run_worker sizes threads to cpus_per_worker: give the caller's back
    return last, session.out_dir / f"checkpoint_{int(last['step']):06d}"


def build_trainer(cfg: Config, loop_config: dict[str, Any], callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer of one run (V2 API); `newsray train` and every tune trial build it here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from newsray.train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=cfg.train.storage_path,
                             callbacks=[_stop_on_user_error(), *(callbacks or [])],
                             # with a validation split: the K best by val_loss are kept (Ray also keeps the latest,
                             # to resume from), so a later, worse checkpoint never deletes the best one
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                                **({"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"}
                                                                   if loop_config.get("val_rows") else {})),
                             # controller_failure_limit: Ray's default (-1) retries a worker group that
                             # cannot be placed forever (measured: a run hung after a node died)
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                                          controller_failure_limit=cfg.train.worker_start_retries)))


def _stop_on_user_error() -> Any:
    """A Train callback: a newsray error raised in a worker (a setting, the data, the model) is the user's to fix,
    so it ends the run at once instead of being retried train.max_failures times.

    It runs in Ray Train's controller; re-raising the worker's error there makes the failure policy see a
    controller error it does not retry (Ray Train V2 has no public hook to classify worker errors)."""
    from ray.train import UserCallback

    class StopOnUserError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for exc in worker_exceptions.values():
                user = user_error(exc)
                if user is not None:
                    raise user

    return StopOnUserError()


@contextlib.contextmanager
def _step_progress(total: int) -> Iterator[list[Any]]:
    """On a terminal, a bar of the run's steps: a Train callback (in Ray Train's controller) puts each
    report's step and loss on a Ray queue that a driver thread reads; yields the callbacks for the run."""
    if not progress_enabled():
        yield []
        return
    import threading
    from queue import Empty

    from ray.train import UserCallback
    from ray.util.queue import Queue

    class StepFeed(UserCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = metrics[0] if metrics else {}
            try:
                self.queue.put_nowait((int(m.get("step", 0)), m.get("loss")))
            except Exception:  # noqa: BLE001, S110 - a progress bar must never fail a training run
                pass

    queue, stop = Queue(actor_options={"num_cpus": 0}), threading.Event()
    with progress("train", total, "steps") as advance:

        def pump() -> None:
            seen = 0
            while not stop.is_set():
                try:
                    step, loss = queue.get(timeout=0.5)
                except Empty:
                    continue
                except Exception:  # noqa: BLE001 - the queue actor went away with the run
                    return
                if step > seen:
                    advance(step - seen, note=f"loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
                    seen = step

        thread = threading.Thread(target=pump, name="newsray-train-progress", daemon=True)
        thread.start()
        try:
            yield [StepFeed(queue)]
        finally:
            stop.set()
            thread.join(timeout=5)
            queue.shutdown()


def train(cfg: Config) -> TrainResult:
    """Train a LoRA adapter with Ray Train; returns where the adapter is and its MLflow run."""
    import mlflow

    from newsray import tracking
    from newsray.raycluster import init_ray, preflight_placement
    from newsray.train.backends import get_backend
    from newsray.train.data import total_steps

    cfg, data = preflight(cfg)
    tracking.check_store(cfg)  # an MLflow server that does not answer: one sentence before any worker starts
    run_name = cfg.train.run_name or ""
    if getattr(get_backend(cfg.train.backend), "remote", False):
        return _train_remote(cfg, data, run_name)
    init_ray(cfg)
    check_resources(cfg, in_process=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))
    preflight_placement(cfg, "train")
    max_steps = total_steps(cfg, len(data.train))
    storage = cfg.train.storage_path
    run_path = f"{storage.rstrip('/')}/{run_name}"
    with tracking.start_run(cfg, run_name=run_name, stage="train", data_hashes=data.data_hashes) as run:
        mlflow.set_tags({"newsray.ray_run_name": run_name, "newsray.ray_run_path": run_path,
                         "newsray.backend": cfg.train.backend, "newsray.resumed": str(cfg.train.resume).lower()})
        mlflow.log_params({"derived.max_steps": max_steps, "derived.n_train": len(data.train), "derived.n_val": len(data.val),
                           "derived.dropped_too_long": data.dropped_train + data.dropped_val})
        loop_config = worker_config(cfg, data, mlflow={"tracking_uri": tracking.tracking_uri(cfg), "run_id": run.info.run_id})
        started = time.perf_counter()
        try:
            with _step_progress(max_steps) as callbacks:
                result = build_trainer(cfg, loop_config, callbacks).fit()
        except Exception as exc:
            latest = _latest_checkpoint(run_path)
            mlflow.set_tag("newsray.latest_checkpoint", latest or "none")
            user = user_error(exc) or _start_timeout_error(exc, cfg, latest)
            if user is not None:
                raise user from None
            raise
        wall = time.perf_counter() - started
        if result.checkpoint is None:
            raise RuntimeError(f"training run {run_name} finished without a checkpoint (see the Ray logs under {run_path}).")
        adapter_dir = _materialize(result.checkpoint, cfg, run_name)
        state = TrainerState.read(adapter_dir)
        metrics = _summary(result.metrics or {}, state, wall)
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"newsray.checkpoint": result.checkpoint.path, "newsray.adapter_dir": str(adapter_dir),
                         **_best_checkpoint_tags(result)})
        _log_adapter(adapter_dir)
        run_id = run.info.run_id
    return TrainResult(adapter_dir=adapter_dir, adapter_uri=f"runs:/{run_id}/adapter", mlflow_run_id=run_id,
                       metrics=metrics, checkpoint=result.checkpoint.path, run_name=run_name)


def _best_checkpoint_tags(result: Any) -> dict[str, str]:
    """The kept checkpoint with the lowest val_loss (tags newsray.best_checkpoint / newsray.best_val_loss), if any has one."""
    scored = [(m["val_loss"], c.path) for c, m in (result.best_checkpoints or []) if isinstance(m.get("val_loss"), (int, float))]
    if not scored:
        return {}
    loss, path = min(scored)
    return {"newsray.best_checkpoint": path, "newsray.best_val_loss": f"{loss:.6g}"}


def _train_remote(cfg: Config, data: TrainData, run_name: str) -> TrainResult:
    """A backend that trains at a remote service (tinker): the loop runs here, no Ray Train workers."""
    import mlflow

    from newsray import tracking
    from newsray.train.backends.tinker import train_remote
    from newsray.train.data import total_steps

    if _is_uri(cfg.train.storage_path):
        raise ConfigError("train.backend=tinker keeps its run records on local storage; set train.storage_path to a directory.")
    max_steps = total_steps(cfg, len(data.train))
    run_dir = _local(cfg.train.storage_path) / run_name
    with tracking.start_run(cfg, run_name=run_name, stage="train", data_hashes=data.data_hashes) as run:
        mlflow.set_tags({"newsray.ray_run_name": run_name, "newsray.ray_run_path": str(run_dir), "newsray.backend": cfg.train.backend,
                         "newsray.resumed": str(cfg.train.resume).lower()})
        mlflow.log_params({"derived.max_steps": max_steps, "derived.n_train": len(data.train), "derived.n_val": len(data.val),
                           "derived.dropped_too_long": data.dropped_train + data.dropped_val})
        started = time.perf_counter()
        adapter_dir, last = train_remote(cfg, data, run_dir, {"tracking_uri": tracking.tracking_uri(cfg), "run_id": run.info.run_id},
                                         max_steps)
        state = TrainerState.read(adapter_dir)
        metrics = _summary(last, state, time.perf_counter() - started)
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"newsray.checkpoint": str(adapter_dir), "newsray.adapter_dir": str(adapter_dir)})
        _log_adapter(adapter_dir)
        run_id = run.info.run_id
    return TrainResult(adapter_dir=adapter_dir, adapter_uri=f"runs:/{run_id}/adapter", mlflow_run_id=run_id,
                       metrics=metrics, checkpoint=str(adapter_dir), run_name=run_name)


def _materialize(checkpoint: Any, cfg: Config, run_name: str) -> Path:
    """A local directory of the final checkpoint: itself on local storage, else downloaded to run_dir."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    target = Path(cfg.tracking.run_dir) / "adapters" / run_name
    return Path(checkpoint.to_directory(str(target)))


def _summary(last: dict[str, Any], state: TrainerState, wall_s: float) -> dict[str, float]:
    """Final numbers of the run (the last report plus a few derived from the history)."""
    out = {f"final_{k}": float(v) for k, v in last.items() if k in ("loss", "val_loss", "lr") and v is not None}
    speeds = [h["tokens_per_s"] for h in state.log_history if "tokens_per_s" in h]
    out |= {"global_step": float(state.global_step), "train_wall_s": wall_s}
    if speeds:
        out["tokens_per_s_mean"] = sum(speeds) / len(speeds)
    return out
