"""Connecting to Ray: a cluster when an address is given, else an in-process Ray sized by the config."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from newsray.config import Config

# Passed to every Ray worker so they behave like the driver (threads, telemetry, offline hub).
_PROPAGATED_ENV = ("OMP_WAIT_POLICY", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE",
                   "HF_HOME", "NEWSRAY_CACHE_DIR", "NEWSRAY_DATA_DIR", "TINKER_BASE_URL", "TINKER_API_KEY")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for Ray workers/actors: the driver's relevant ones plus `extra`."""
    env = {k: os.environ[k] for k in _PROPAGATED_ENV if os.environ.get(k)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env | (extra or {})


def ensure_auth_token() -> None:
    """With token auth, make sure Ray finds a token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token); create the default file (mode 0600) if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def init_ray(cfg: Config, extra_env: dict[str, str] | None = None) -> Any:
    """`ray.init` once: `ray.address` / $RAY_ADDRESS if set, else in-process with the configured size.

    Ray's auth mode is always chosen explicitly (ray.auth_mode, or $RAY_AUTH_MODE if the user set
    it): an in-process Ray and a `ray start` head must agree, or the CLI and Jobs SDK are refused.
    """
    # Before `import ray`: Ray reads its auth mode when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)
    if os.environ["RAY_AUTH_MODE"] == "token":
        ensure_auth_token()
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env(extra_env)}
    if address:
        # Inside a submitted job the job's runtime_env (working_dir, py_modules, env_vars) applies
        # too: combine it with ours instead of refusing the overlap.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": a new in-process Ray even when a `ray start` cluster runs on this
        # machine (a bare ray.init() would attach to the newest one and refuse num_cpus).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory_mb * 1024 * 1024,
                 include_dashboard=cfg.ray.include_dashboard, runtime_env=runtime_env, log_to_driver=True)
    return ray
