"""Ray Serve deployment of the news-analysis API (see docs/SERVING.md).

The entry points here import Ray only after setting its auth mode from the config: Ray reads
RAY_AUTH_MODE once, when it is imported (newsray.raycluster.init_ray explains why it matters).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from newsray.config import Config


def _ray_env(cfg: Config) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)  # the same rule as init_ray, but before `import ray`


def build_app(cfg: Config, model_ref: str) -> Any:
    """The Serve application (ingress -> model deployment) for `model_ref` plus serve.adapters."""
    _ray_env(cfg)
    from newsray.serving.app import build_app as build

    return build(cfg, model_ref)


def run(cfg: Config, model_ref: str, blocking: bool = True, on_ready: Callable[[str], None] | None = None,
        detach: bool = False) -> str:
    """Start the app (in-process Ray, or the cluster of ray.address) and return its URL (see app.run)."""
    _ray_env(cfg)
    from newsray.serving.app import run as start

    return start(cfg, model_ref, blocking=blocking, on_ready=on_ready, detach=detach)


__all__ = ["build_app", "run"]
