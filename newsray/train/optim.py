"""Optimizer, learning-rate schedule, precision and the optimizer step (plain torch/DDP or DeepSpeed)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from newsray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from newsray.config import Config


def check_precision_and_optimizer(cfg: Config) -> None:
    """Refuse GPU-only settings on CPU workers (driver side, before any worker starts)."""
    if cfg.train.use_gpu:
        return
    if cfg.model.load_in_4bit:
        raise ConfigError("model.load_in_4bit (4-bit QLoRA) needs GPU workers; set model.load_in_4bit=false or train.use_gpu=true.")
    if cfg.train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        raise ConfigError(f"train.optimizer={cfg.train.optimizer} is a bitsandbytes GPU optimizer; use train.optimizer=adamw_torch on CPU.")
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 is for GPUs; use bf16 (CPUs with AMX/AVX512-BF16) or fp32 on CPU.")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None = fp32; auto = bf16 where the hardware has it (CUDA or CPU AMX/AVX512-BF16)."""
    import torch

    if name == "fp32":
        return None
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if name == "bf16" and not bf16:
            raise ConfigError("train.precision=bf16: this GPU has no bf16; use fp16 or fp32.")
        return torch.bfloat16 if bf16 else torch.float16
    cpu_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if name == "bf16" and not cpu_bf16:
        raise ConfigError("train.precision=bf16: this CPU has no bf16 support (AVX512-BF16/AMX); use fp32.")
    return torch.bfloat16 if cpu_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or a no-op for fp32."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(cfg: Config, params: list[Any]) -> Any:
    """AdamW (torch), AdamW8bit / PagedAdamW8bit (bitsandbytes, GPU) or SGD over the trainable params."""
    import torch

    lr, wd = cfg.train.learning_rate, cfg.train.weight_decay
    if cfg.train.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.train.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=wd)


def build_scheduler(cfg: Config, optimizer: Any, total_steps: int) -> Any:
    """transformers' linear / cosine / constant(-with-warmup) schedule over `total_steps`."""
    from transformers import get_scheduler

    return get_scheduler(cfg.train.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=min(cfg.train.warmup_steps, total_steps), num_training_steps=total_steps)


class TorchStepper:
    """Plain torch (optionally DDP): scaled backward, no_sync between micro-steps, clip, step."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, cfg: Config, amp: torch.dtype | None):
        import torch

        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accum, self.max_norm = cfg.train.grad_accum_steps, cfg.train.max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        use_scaler = amp is torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def sync_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's all-reduce on all but the last micro-step of an accumulation."""
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last_micro or no_sync is None else no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def step(self) -> float:
        """Clip, step, schedule, zero grads; returns the pre-clip gradient norm."""
        import torch

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm if self.max_norm > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


class DeepSpeedStepper:
    """DeepSpeed ZeRO 0-2 engine (GPU, hf backend): it owns accumulation, clipping and the step."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, cfg: Config, amp: torch.dtype | None):
        import deepspeed
        import torch

        ds = json.loads(Path(cfg.train.deepspeed or "").read_text())
        for key, value in (("train_micro_batch_size_per_gpu", cfg.train.per_device_batch_size),
                           ("gradient_accumulation_steps", cfg.train.grad_accum_steps),
                           ("gradient_clipping", cfg.train.max_grad_norm)):
            if ds.get(key, "auto") == "auto":
                ds[key] = value
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
        if amp is torch.bfloat16:
            ds.setdefault("bf16", {"enabled": True})
        elif amp is torch.float16:
            ds.setdefault("fp16", {"enabled": True})
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        self.model = self.engine

    def sync_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # a no-op on all but accumulation boundaries

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
