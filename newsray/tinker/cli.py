"""`newsray tinker-server` arguments -> Settings -> the running server (the CLI itself stays thin)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from newsray.errors import ConfigError


def offered_models(specs: list[str]) -> dict[str, str]:
    """--model NAME or SERVED=NAME -> {served name: newsray model name}; default: the embedded SmolLM2."""
    from newsray.models import DEFAULT_MODEL

    out: dict[str, str] = {}
    for spec in specs or [DEFAULT_MODEL]:
        served, _, ref = spec.partition("=")
        if not served.strip() or (ref == "" and "=" in spec):
            raise ConfigError(f"--model {spec!r}: expected NAME or SERVED_NAME=NAME.")
        out[served.strip()] = (ref or served).strip()
    return out


def server_key(api_key_env: str, api_key_file: Path | None, no_auth: bool) -> str | None:
    if no_auth:
        return None
    key = os.environ.get(api_key_env, "").strip()
    if not key and api_key_file:
        try:
            key = Path(api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--api-key-file: cannot read {api_key_file} ({e.strerror or e}).") from None
    if not key:
        raise ConfigError(f"tinker-server needs the API key clients will send: set ${api_key_env} (a tml-... key), "
                          "pass --api-key-file, or --no-auth for loopback experiments.")
    return key


def run_server(*, port: int, host: str, storage: Path, models: list[str], api_key_env: str, api_key_file: Path | None,
               no_auth: bool, cpus: float, gpus: float, max_body_mb: int, ray_address: str | None,
               on_ready: Callable[[str, list[str]], None]) -> None:
    from newsray.models import prepare_model
    from newsray.tinker.server import Settings, serve

    offered = offered_models(models)
    for ref in offered.values():
        prepare_model(ref, progress=lambda m: print(m, file=sys.stderr))  # ModelError before anything starts
    settings = Settings(offered=offered, storage=Path(storage).expanduser().resolve(), api_key=server_key(api_key_env, api_key_file, no_auth),
                        max_body_bytes=max_body_mb * 1024 * 1024)
    serve(settings, host, port, cpus, gpus, ray_address or os.environ.get("RAY_ADDRESS"), lambda url: on_ready(url, list(offered)))
