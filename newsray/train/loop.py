"""The per-worker training loop: a plain, readable torch loop run by every Ray Train worker (rank).

Model from the backend, completion-only rows from the driver, deterministic sharded batches,
AdamW + schedule, autocast, grad accumulation and clipping, DDP (gloo on CPU, NCCL on GPU) through
ray.train.torch.prepare_model. Every `checkpoint_every_steps` steps and at the end, rank 0 writes
the adapter directory (+ training_state.pt) and every rank calls ray.train.report; on (re)start
the loop resumes from ray.train.get_checkpoint() and runs to the same final step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from newsray.train.checkpoint import TrainerState

# Test hook for the recovery test: "STEP:MARKER" makes rank 0 SIGKILL itself once after STEP.
KILL_ENV = "NEWSRAY_TEST_KILL_AFTER_STEP"


class RaySession:
    """Rank, device, checkpoint and report of a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self.node_id = ray.get_runtime_context().get_node_id()

    def device(self, use_gpu: bool) -> Any:
        import ray.train.torch

        dev = ray.train.torch.get_device()
        return dev[0] if isinstance(dev, list) else dev

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, float], directory: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{int(metrics['step']):06d}" if ckpt else None)

    def prepare(self, model: Any, device: Any, move: bool) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=device if move else False)


class LocalSession:
    """One process without Ray (benchmarks, debugging): checkpoints go to `out_dir`/checkpoint_NNNNNN."""

    rank, world_size, local_rank, node_id = 0, 1, 0, "local"

    def __init__(self, out_dir: Path, resume_from: Path | None = None):
        self.out_dir, self.resume_from, self.reports = Path(out_dir), resume_from, []

    def device(self, use_gpu: bool) -> Any:
        import torch

        return torch.device("cuda:0" if use_gpu else "cpu")

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, float], directory: Path | None) -> None:
        import shutil

        self.reports.append(dict(metrics))
        if directory is not None:
            shutil.copytree(directory, self.out_dir / f"checkpoint_{int(metrics['step']):06d}", dirs_exist_ok=True)

    def prepare(self, model: Any, device: Any, move: bool) -> Any:
        return model.to(device) if move else model


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Ray Train entry point of one worker; `config` is built by newsray.train.driver."""
    return run_worker(config, RaySession())


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) floats over ranks; identity without a process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


class _MlflowLogger:
    """Per-step metrics straight into the driver's MLflow run (rank 0 only; survives worker crashes)."""

    def __init__(self, spec: dict[str, str] | None, rank: int):
        self.client = None
        if spec and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri=spec["tracking_uri"]), spec["run_id"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log, never fail training: MLflow's client retries a server that is down (with backoff, so
        the step waits and the metrics arrive late); past its retries the metrics are lost, with a warning."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        except Exception as e:  # noqa: BLE001 - a tracking outage must not end a training run
            import sys

            print(f"newsray: warning: step {step} metrics not logged to MLflow ({type(e).__name__}: {str(e)[:200]})",
                  file=sys.stderr, flush=True)


def _validation_loss(model: Any, batches: list[dict[str, Any]], device: Any, amp: Any, sliced_logits: bool) -> float | None:
    """Token-weighted mean loss over every rank's validation shard (None without a val split)."""
    import torch

    from newsray.train.loss import completion_loss
    from newsray.train.optim import autocast

    total, tokens = 0.0, 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            n = float((b["labels"][:, 1:] != -100).sum())
            with autocast(device, amp):
                loss = completion_loss(model, b, sliced_logits)
            total, tokens = total + float(loss) * n, tokens + n
    model.train(was_training)
    total, tokens = _all_reduce([total, tokens])
    return total / tokens if tokens else None


def _newest(*dirs: Path | str | None) -> Path | None:
    """The checkpoint directory with the highest global_step among those given (None if none)."""
    found = [Path(d) for d in dirs if d and (Path(d) / "trainer_state.json").is_file()]
    return max(found, key=lambda d: TrainerState.read(d).global_step) if found else None


def rank_fingerprints(node_id: str, model: Any) -> list[dict[str, Any]]:
    """Every rank's node id, pid and a digest of its LoRA weights (equal digests: gradients in sync)."""
    import hashlib

    import torch.distributed as dist

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            h.update(p.detach().float().cpu().numpy().tobytes())
    mine = {"node_id": node_id, "pid": os.getpid(), "lora_sha256": h.hexdigest()[:16]}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _versions() -> dict[str, str]:
    """Versions of the libraries that built and trained the model in this worker."""
    import importlib.metadata
    import sys

    names = ["torch", "transformers", "peft"] + [m for m in ("unsloth", "unsloth_zoo", "deepspeed", "bitsandbytes") if m in sys.modules]
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _maybe_kill(spec: str | None, step: int, rank: int) -> None:
    """Recovery-test hook: SIGKILL this worker once after `step` (a marker file makes it once)."""
    if not spec or rank != 0:
        return
    at, _, marker = spec.partition(":")
    if step == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"killed pid {os.getpid()} after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def run_worker(config: dict[str, Any], session: Any) -> dict[str, float]:
    """Train one rank to `max_steps`, resuming from the session's checkpoint if there is one."""
    from newsray.config import Config
    from newsray.train.backends import get_backend

    cfg = Config.model_validate(config["cfg"])
    backend = get_backend(cfg.train.backend)
    import torch

    torch.set_num_threads(max(1, math.ceil(cfg.train.cpus_per_worker)))  # 1.5 CPUs on 2 cores: 2 threads
    device = session.device(cfg.train.use_gpu)
    backend.setup_worker(cfg, device)  # before transformers is imported (Unsloth)

    from transformers import set_seed

    from newsray.models import load_tokenizer
    from newsray.train import checkpoint as ck
    from newsray.train.data import ShardedBatches, eval_batches
    from newsray.train.loss import completion_loss
    from newsray.train.optim import (
        DeepSpeedStepper,
        TorchStepper,
        autocast,
        build_optimizer,
        build_scheduler,
        resolve_precision,
    )

    rank, world = session.rank, session.world_size
    set_seed(cfg.train.seed)  # identical LoRA init on every rank
    tokenizer = load_tokenizer(cfg.model)
    model = backend.build(cfg, device)
    amp = resolve_precision(cfg.train.precision, device)
    max_steps, accum = int(config["max_steps"]), cfg.train.grad_accum_steps
    batches = ShardedBatches(config["train_rows"], cfg.train.per_device_batch_size, rank, world, cfg.train.seed, config["pad_id"],
                             group_by_length=cfg.train.group_by_length)
    sliced = getattr(backend, "sliced_logits", False)
    val = eval_batches(config["val_rows"], cfg.train.per_device_batch_size, rank, world, config["pad_id"])
    state = TrainerState(max_steps=max_steps, micro_batches_per_epoch=batches.per_epoch, world_size=world,
                         seed=cfg.train.seed, run_name=cfg.train.run_name or "", backend=backend.name, versions=_versions())
    mlflow_log = _MlflowLogger(config.get("mlflow"), rank)

    with session.checkpoint_dir() as ray_dir, tempfile.TemporaryDirectory(prefix="newsray-resume-") as fetched:
        # Ray's registered checkpoint, train.resume's, or one this run persisted before a worker died
        # but that the controller had not yet registered (a kill right after ray.train.report). The
        # run directory is local or in object storage (s3://...): read through pyarrow.fs.
        on_disk = ck.latest_complete(config["run_dir"]) if config.get("run_dir") else None
        candidates = [ray_dir] + [ck.local_copy(loc, Path(fetched) / str(i)) for i, loc in enumerate((config.get("resume_dir"), on_disk)) if loc]
        resume_dir = _newest(*candidates)
        if resume_dir is not None:
            ck.load_adapter_weights(model, resume_dir)
            old = ck.TrainerState.read(resume_dir)
            state.global_step, state.log_history = old.global_step, old.log_history
            state.resumed_from_steps = old.resumed_from_steps + [old.global_step]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, trainable)
        scheduler = build_scheduler(cfg, optimizer, max_steps)
        if cfg.train.deepspeed:
            stepper: Any = DeepSpeedStepper(model, optimizer, scheduler, cfg, amp)
        else:
            stepper = TorchStepper(session.prepare(model, device, move=not cfg.model.load_in_4bit), optimizer, scheduler, cfg, amp)
        if resume_dir is not None:
            ck.restore_training_state(resume_dir, stepper.optimizer, stepper.scheduler, restore_rng=rank == 0,
                                      scaler=getattr(stepper, "scaler", None))
    if resume_dir is not None:
        if rank != 0:
            torch.manual_seed(cfg.train.seed + 1000 * rank + state.global_step)
        mlflow_log.log({"resumed_from_step": state.global_step}, state.global_step)
    elif rank != 0:
        torch.manual_seed(cfg.train.seed + 1000 * rank)  # distinct dropout streams per rank
    state.micro_batches_seen = state.global_step * accum
    state.epoch = state.micro_batches_seen / max(1, batches.per_epoch)
    train_model, unwrapped = stepper.model, model
    train_model.train()
    last: dict[str, float] = {}

    while state.global_step < max_steps:
        t0, loss_sum, tokens = time.perf_counter(), 0.0, 0
        for micro in range(accum):
            b = {k: v.to(device) for k, v in batches.batch(state.micro_batches_seen).items()}
            with stepper.sync_context(micro == accum - 1):
                with autocast(device, amp):
                    loss = completion_loss(train_model, b, sliced)
                stepper.backward(loss)
            loss_sum += float(loss.detach())
            tokens += int(b["attention_mask"].sum())
            state.micro_batches_seen += 1
        grad_norm = stepper.step()
        state.global_step += 1
        state.epoch = state.micro_batches_seen / max(1, batches.per_epoch)
        elapsed = time.perf_counter() - t0
        loss_all, tokens_all = _all_reduce([loss_sum / accum, float(tokens)])
        (elapsed_max,) = _all_reduce([elapsed], op="max")
        step = state.global_step
        metrics = {"step": step, "epoch": round(state.epoch, 4), "loss": loss_all / world,
                   "lr": float(stepper.scheduler.get_last_lr()[0]), "grad_norm": grad_norm,
                   "tokens_per_s": tokens_all / max(elapsed_max, 1e-9), "step_time_s": elapsed_max}
        is_ckpt = step % cfg.train.checkpoint_every_steps == 0 or step == max_steps
        if is_ckpt and val:
            val_loss = _validation_loss(unwrapped if not cfg.train.deepspeed else stepper.engine.module, val, device, amp, sliced)
            if val_loss is not None:
                metrics["val_loss"] = val_loss
        if step % cfg.train.logging_steps == 0 or is_ckpt:
            state.log_history.append({k: metrics[k] for k in ("step", "epoch", "loss", "lr", "tokens_per_s") if k in metrics}
                                     | ({"val_loss": metrics["val_loss"]} if "val_loss" in metrics else {}))
            mlflow_log.log({k: v for k, v in metrics.items() if k != "step"}, step)
            if is_ckpt:
                state.ranks = rank_fingerprints(getattr(session, "node_id", "local"), unwrapped)
                with tempfile.TemporaryDirectory(prefix="newsray-ckpt-") as tmp:
                    directory = None
                    if rank == 0:
                        directory = Path(tmp)
                        ck.save_adapter_dir(directory, unwrapped, tokenizer, cfg, state)
                        ck.save_training_state(directory, stepper.optimizer, stepper.scheduler, state, getattr(stepper, "scaler", None))
                    session.report(metrics, directory)
            else:
                session.report(metrics, None)
        last = metrics
        _maybe_kill(config.get("kill_after_step"), step, rank)
    return last
