"""The unsloth backend: FastLanguageModel + its LoRA (GPU kernels; Unsloth's CPU fallback on CPU)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from newsray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from newsray.config import Config

INSTALL = "pip install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9"


class UnslothBackend:
    """Unsloth: imported only inside the worker, before transformers, with the worker's device pinned."""

    name = "unsloth"
    sliced_logits = False  # its patched forward takes only an int logits_to_keep; it has its own fused loss

    def preflight(self, cfg: Config) -> None:
        if importlib.util.find_spec("unsloth") is None or importlib.util.find_spec("unsloth_zoo") is None:
            raise ConfigError(f"train.backend=unsloth needs Unsloth: run `{INSTALL}` (or use train.backend=hf).")
        if cfg.train.deepspeed:
            raise ConfigError("train.deepspeed is supported with train.backend=hf only; remove it or switch backends.")

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        import sys

        import torch

        if device.type == "cuda":
            # Ray gives each worker its devices through CUDA_VISIBLE_DEVICES; Unsloth binds to the
            # current device when imported, so pin it first (one rank = one GPU).
            torch.cuda.set_device(device)
        if "transformers" in sys.modules and "unsloth" not in sys.modules:
            print("newsray: transformers was imported before unsloth in this worker; Unsloth's patches may be partial.",
                  file=sys.stderr)
        import unsloth  # noqa: F401  (patches transformers/peft; must come before them)

    def build(self, cfg: Config, device: torch.device) -> Any:
        from unsloth import FastLanguageModel

        from newsray.models import prepare_model, resolve_dtype

        resolved = prepare_model(cfg.model.name)
        dtype = None if cfg.model.dtype == "auto" else resolve_dtype(cfg.model.dtype, str(device))
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=resolved.source, max_seq_length=cfg.model.max_seq_length,
            load_in_4bit=cfg.model.load_in_4bit, dtype=dtype, local_files_only=True)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
            use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False,
            random_state=cfg.train.seed)
        return model  # placed on the current (pinned) device by Unsloth
