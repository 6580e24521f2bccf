"""The hf backend: transformers + PEFT LoRA (optional 4-bit QLoRA and DeepSpeed ZeRO on GPUs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from newsray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from newsray.config import Config


def peft_lora_config(cfg: Config) -> Any:
    """The PEFT LoraConfig of the run's lora section."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias=cfg.lora.bias,
                      use_rslora=cfg.lora.use_rslora, task_type=TaskType.CAUSAL_LM)


def check_deepspeed(cfg: Config) -> None:
    """train.deepspeed must be a readable ZeRO stage 0-2 JSON file, used with GPUs."""
    path = Path(cfg.train.deepspeed or "")
    if not cfg.train.use_gpu:
        raise ConfigError(f"train.deepspeed ({path}) is for multi-GPU training; set train.use_gpu=true or remove train.deepspeed on CPU.")
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.deepspeed: {path} is not a readable DeepSpeed JSON config ({e}).") from None
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"train.deepspeed: {path} asks for ZeRO stage {stage}; newsray saves adapters with ZeRO stages 0-2 only.")


class HFBackend:
    """transformers + PEFT: the portable backend (CPU and GPU)."""

    name = "hf"
    sliced_logits = True  # the forward takes a logits_to_keep mask (newsray.train.loss)

    def preflight(self, cfg: Config) -> None:
        if cfg.train.deepspeed:
            check_deepspeed(cfg)

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        import torch

        if device.type == "cuda":
            torch.cuda.set_device(device)

    def build(self, cfg: Config, device: torch.device) -> Any:
        from peft import get_peft_model, prepare_model_for_kbit_training

        from newsray.models import load_model

        model = load_model(cfg.model, str(device))
        model.config.use_cache = False
        if cfg.model.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, peft_lora_config(cfg))
