"""Ray Serve deployment of the news-analysis API (see docs/SERVING.md).

The entry points here import Ray only after setting its auth mode from the config: Ray reads
RAY_AUTH_MODE once, when it is imported (newsray.raycluster.init_ray explains why it matters).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from newsray.config import Config
from newsray.errors import ConfigError


def _ray_env(cfg: Config) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)  # the same rule as init_ray, but before `import ray`


def on_cluster(cfg: Config) -> bool:
    """True when this process talks to a running cluster (ray.address or $RAY_ADDRESS), not an in-process Ray."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def served_spec(model_ref: str, cfg: Config, device: str = "cpu") -> Any:
    """`model_ref` resolved (newsray.generation.ModelSpec) as a replica on `device` loads it: its base model in serve.dtype."""
    from newsray.generation import on_device, resolve_model_ref

    return on_device(resolve_model_ref(model_ref, cfg), cfg.serve.dtype, device)


def check_port(cfg: Config) -> None:
    """ConfigError if serve.host:serve.port cannot be bound here (an in-process Serve would hang on it)."""
    if on_cluster(cfg):
        return  # the cluster's Serve proxy owns the port, not this machine
    host, port = cfg.serve.host, cfg.serve.port
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "taken"
            sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"serve.port {port} on {host} is not free ({e.strerror}); pass serve.port=<a free port> "
                          "(or pipeline.serve=false to skip serving in `newsray pipeline`).") from None


def build_app(cfg: Config, model_ref: str) -> Any:
    """The Serve application (ingress -> model deployment) for `model_ref` plus serve.adapters."""
    _ray_env(cfg)
    from newsray.serving.app import build_app as build

    return build(cfg, model_ref)


def run(cfg: Config, model_ref: str, blocking: bool = True, on_ready: Callable[[str], None] | None = None,
        detach: bool = False) -> str:
    """Start the app (in-process Ray, or the cluster of ray.address) and return its URL (see app.run)."""
    check_port(cfg)
    _ray_env(cfg)
    from newsray.serving.app import run as start

    return start(cfg, model_ref, blocking=blocking, on_ready=on_ready, detach=detach)


__all__ = ["build_app", "check_port", "on_cluster", "run"]
