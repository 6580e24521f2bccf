"""`newsray tinker-server`: the part of the Tinker HTTP API the pinned SDK uses for supervised LoRA work.

Requests are validated with the SDK's own types (JSON) and protobuf messages (forward_backward,
results of forward_backward and sampling). Each training request becomes a call on the worker actor,
submitted in the model's seq_id order; its result is a future the client polls with
/api/v1/retrieve_future (long poll, then `{"type": "try_again"}`). Checkpoints are PEFT adapter
directories under --storage: <storage>/<model_id>/<weights|sampler_weights|external_weights>/<name>.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsray.tinker import protocol as P
from newsray.tinker.routes import add_routes

LONG_POLL_S = 20.0  # retrieve_future waits this long for a result before answering try_again (SDK timeout: 45 s)
SESSION_TIMEOUT_S = 180.0  # a session without heartbeats for this long is finished and its models freed
MAX_RESULTS = 10_000


@dataclass
class Settings:
    """What `newsray tinker-server` is started with."""

    offered: dict[str, str]  # model name clients ask for -> newsray model name/ref (embedded, hub id, local dir)
    storage: Path
    api_key: str | None
    max_body_bytes: int = 64 * 1024 * 1024
    signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))


@dataclass
class TrainModel:
    model_id: str
    session_id: str
    base_model: str
    rank: int
    next_seq: int = 1
    pending: dict[int, Callable[[], None]] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)


class State:
    """Sessions, models, sampling sessions and request futures of one server process."""

    def __init__(self, settings: Settings, actor: Any):
        self.settings, self.actor = settings, actor
        self.sessions: dict[str, dict[str, Any]] = {}
        self.models: dict[str, TrainModel] = {}
        self.samplers: dict[str, dict[str, Any]] = {}
        self.futures: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------------ futures
    def submit(self, call: Callable[[], Awaitable[Any]]) -> str:
        """Start `call` (an actor call plus its post-processing) now; returns its request id."""
        rid = f"req-{uuid.uuid4().hex}"
        self.futures[rid] = asyncio.ensure_future(call())
        while len(self.futures) > MAX_RESULTS:
            self.futures.pop(next(iter(self.futures)))
        return rid

    def submit_ordered(self, model_id: str, seq_id: int | None, call: Callable[[], Awaitable[Any]]) -> str:
        """Submit a training request in the model's seq_id order (a repeated seq_id returns its first future)."""
        m = self.model(model_id)
        seq = m.next_seq if seq_id is None else int(seq_id)
        if seq in m.seen:
            return m.seen[seq]
        if seq < m.next_seq:
            raise P.ProtocolError(f"seq_id {seq} of {model_id} is older than the last one processed ({m.next_seq - 1})")
        rid = f"req-{uuid.uuid4().hex}"
        m.seen[seq] = rid
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future = loop.create_future()
        self.futures[rid] = asyncio.ensure_future(_after(waiter, call))
        m.pending[seq] = lambda: waiter.set_result(None)
        while m.next_seq in m.pending:  # release every request whose predecessors have all arrived
            m.pending.pop(m.next_seq)()
            m.next_seq += 1
        return rid

    async def result(self, request_id: str, timeout: float = LONG_POLL_S) -> tuple[str, Any]:
        """("pending", None) | ("ok", value) | ("error", message)."""
        task = self.futures.get(request_id)
        if task is None:
            raise P.NotFound(f"unknown request_id {request_id!r}")
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            return "pending", None
        exc = task.exception()
        if exc is not None:
            return "error", _describe(exc)
        return "ok", task.result()

    # ------------------------------------------------------------------ sessions / models
    def session(self, session_id: str) -> dict[str, Any]:
        s = self.sessions.get(session_id)
        if s is None:
            raise P.NotFound(f"unknown session {session_id!r}")
        if s["finished"]:
            raise P.Gone(f"session {session_id} has finished")
        return s

    def model(self, model_id: str) -> TrainModel:
        m = self.models.get(model_id)
        if m is None:
            raise P.NotFound(f"unknown model_id {model_id!r} (create it with create_model first)")
        return m

    def check_base(self, name: str) -> None:
        if name not in self.settings.offered:
            raise P.ProtocolError(f"base model {name!r} is not offered by this server; it offers: {', '.join(self.settings.offered)}")

    def finish(self, session_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is None or s["finished"]:
            return
        s["finished"] = time.time()
        for mid in [m.model_id for m in self.models.values() if m.session_id == session_id]:
            self.models.pop(mid)
            self.actor.drop_model.remote(mid)  # after the model's queued calls (actor calls run in order)

    async def reap(self) -> None:
        """Finish sessions whose client stopped sending heartbeats (frees their models)."""
        while True:
            await asyncio.sleep(15)
            now = time.time()
            for sid, s in list(self.sessions.items()):
                if not s["finished"] and now - s["heartbeat"] > SESSION_TIMEOUT_S:
                    self.finish(sid)

    # ------------------------------------------------------------------ storage
    def directory(self, model_id: str, kind: str, name: str) -> Path:
        return self.settings.storage / _safe(model_id) / P.KIND_SEGMENTS[kind] / _check_name(name)

    def directory_of(self, path: str) -> tuple[Path, dict[str, Any]]:
        """The directory and metadata of a tinker:// checkpoint path written by this server."""
        from newsray.tinker.worker import META_FILE

        model_id, kind, name = P.parse_tinker_path(path)
        d = self.directory(model_id, kind, name)
        if not (d / META_FILE).is_file():
            raise P.NotFound(f"checkpoint {path} does not exist on this server")
        return d, json.loads((d / META_FILE).read_text())

    def sign(self, *parts: str) -> str:
        return hmac.new(self.settings.signing_key, "/".join(parts).encode(), hashlib.sha256).hexdigest()


async def _after(waiter: asyncio.Future, call: Callable[[], Awaitable[Any]]) -> Any:
    await waiter
    return await call()


def _describe(exc: BaseException) -> str:
    """A Ray task error -> the worker's own exception text (one line)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _safe(model_id: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "_", model_id)  # no '.', '/': a model id cannot leave the storage directory


def _check_name(name: str) -> str:
    """A checkpoint or file name that cannot leave its directory."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name or ""):
        raise P.ProtocolError(f"checkpoint name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
    return name


def create_app(settings: Settings, actor: Any) -> Any:
    """The FastAPI app (the actor is a `TinkerWorker` Ray actor handle)."""
    from fastapi import FastAPI

    state = State(settings, actor)
    app = FastAPI(title="newsray tinker-server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tinker = state

    @app.on_event("startup")
    async def _start_reaper() -> None:
        app.state.reaper = asyncio.ensure_future(state.reap())

    add_routes(app, state)
    return app


def serve(settings: Settings, host: str, port: int, num_cpus: float, num_gpus: float, ray_address: str | None,
          on_ready: Callable[[str], None]) -> None:
    """Start Ray (or join ray_address), the worker actor and the HTTP server; blocks until Ctrl-C."""
    import socket

    import ray
    import uvicorn

    from newsray.config import Config
    from newsray.raycluster import init_ray
    from newsray.tinker.worker import TinkerWorker

    cfg = Config()
    cfg.ray.address = ray_address
    init_ray(cfg)
    device = "cuda" if num_gpus > 0 else "cpu"
    actor = ray.remote(TinkerWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=1).remote(
        settings.offered, max(1, int(num_cpus + 0.999)), device)
    settings.storage.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, actor)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=75))
    on_ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        ray.kill(actor)
