"""Worker backends: how a Ray Train worker builds the LoRA model (hf = transformers+PEFT, unsloth),
or, for tinker, a remote service that trains while the driver runs the loop (backend.remote)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from newsray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from newsray.config import Config

KNOWN = ("hf", "unsloth", "tinker")


class Backend(Protocol):
    """Builds the trainable PEFT model inside a worker; checks what it can on the driver first."""

    name: str

    def preflight(self, cfg: Config) -> None:
        """Driver-side checks (before any worker starts); raise ConfigError with one clear sentence."""

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        """Process-level setup that must precede importing transformers (device pinning, patches)."""

    def build(self, cfg: Config, device: torch.device) -> Any:
        """The PEFT-wrapped causal LM with only the LoRA parameters trainable, on `device`."""


def get_backend(name: str) -> Backend:
    """The backend named by `train.backend`."""
    if name == "hf":
        from newsray.train.backends.hf import HFBackend

        return HFBackend()
    if name == "unsloth":
        from newsray.train.backends.unsloth import UnslothBackend

        return UnslothBackend()
    if name == "tinker":
        from newsray.train.backends.tinker import TinkerBackend

        return TinkerBackend()
    raise ConfigError(f"train.backend: unknown backend {name!r}; use one of {', '.join(KNOWN)}.")
