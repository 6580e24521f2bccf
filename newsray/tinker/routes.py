"""The HTTP endpoints of `newsray tinker-server` (paths, bodies and answers as the pinned SDK expects)."""

from __future__ import annotations

import datetime
import hmac
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response

from newsray.tinker import protocol as P

if TYPE_CHECKING:
    from newsray.tinker.server import State

OPEN_PATHS = ("/api/v1/healthz", "/api/v1/download/")
URL_TTL_S = 3600


def _json_error(status: int, detail: str) -> Any:
    return JSONResponse({"detail": detail}, status_code=status)


def _parse(model: Any, body: bytes, endpoint: str) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise P.ProtocolError(f"{endpoint}: {where}: {first['msg']}") from None


def add_routes(app: Any, state: State) -> None:
    from tinker import types as T

    settings = state.settings

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        """X-API-Key check, body limit, no compressed bodies; user errors become 4xx with a sentence."""
        path = request.url.path
        if settings.api_key and not path.startswith(OPEN_PATHS):
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return _json_error(401, "invalid or missing API key (send it in the X-API-Key header)")
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > settings.max_body_bytes:
            return _json_error(413, f"request body of {size} bytes is over the limit of {settings.max_body_bytes}")
        if request.headers.get("content-encoding", "identity") not in ("identity", ""):
            return _json_error(415, "compressed request bodies are not accepted by this server")
        return await call_next(request)

    @app.exception_handler(P.ProtocolError)
    async def protocol_error(request: Request, exc: P.ProtocolError) -> Any:
        status = 404 if isinstance(exc, P.NotFound) else 410 if isinstance(exc, P.Gone) else 400
        return _json_error(status, str(exc))

    async def body(request: Request) -> bytes:
        data = await request.body()
        if len(data) > settings.max_body_bytes:
            raise P.ProtocolError(f"request body over the limit of {settings.max_body_bytes} bytes")
        return data

    # ---------------------------------------------------------------- service
    @app.get("/api/v1/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/api/v1/client/config")
    async def client_config(request: Request) -> dict:
        _parse(T.ClientConfigRequest, await body(request), "client/config")
        return T.ClientConfigResponse(pjwt_auth_enabled=False, use_pyqwest_transport=False, parallel_fwdbwd_chunks=False,
                                      proto_compress_fwdbwd=False, sample_use_retrieve_futures=False,
                                      custom_loss_server_side=False, sample_join_sampling_session=False).model_dump()

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict:
        return T.ClientDynamicConfigResponse(sample_cancel_enabled=False).model_dump()

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request) -> dict:
        await body(request)
        return {"status": "accepted"}  # accepted and dropped: nothing leaves this machine

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities() -> dict:
        return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in settings.offered]}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request) -> dict:
        _parse(T.CreateSessionRequest, await body(request), "create_session")
        sid = f"session-{uuid.uuid4().hex[:16]}"
        state.sessions[sid] = {"created": time.time(), "heartbeat": time.time(), "finished": None}
        return {"type": "create_session", "session_id": sid}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request) -> dict:
        req = _parse(T.SessionHeartbeatRequest, await body(request), "session_heartbeat")
        state.session(req.session_id)["heartbeat"] = time.time()
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str) -> Any:
        if session_id not in state.sessions:
            raise P.NotFound(f"unknown session {session_id!r}")
        state.finish(session_id)
        return Response(status_code=200, content=b"null", media_type="application/json")

    # ---------------------------------------------------------------- models
    @app.post("/api/v1/create_model")
    async def create_model(request: Request) -> dict:
        from newsray.tinker.server import TrainModel

        req = _parse(T.CreateModelRequest, await body(request), "create_model")
        state.session(req.session_id)
        state.check_base(req.base_model)
        if req.lora_config is None:
            raise P.ProtocolError("create_model: full fine-tuning is not implemented; pass a lora_config")
        if getattr(req.optimizer_config, "type", "adamw") != "adamw":
            raise P.ProtocolError(f"create_model: optimizer {req.optimizer_config.type!r} is not implemented (only adamw)")
        mid = f"{req.session_id}:train:{req.model_seq_id}"
        lc = req.lora_config
        state.models[mid] = TrainModel(mid, req.session_id, req.base_model, lc.rank)
        ref = state.actor.create_model.remote(mid, req.base_model, lc.rank, lc.seed, lc.train_attn, lc.train_mlp, lc.train_unembed)

        async def done() -> dict:
            await ref
            return {"model_id": mid, "type": "create_model"}

        return {"request_id": state.submit(done), "model_id": mid}

    @app.post("/api/v1/get_info")
    async def get_info(request: Request) -> dict:
        from newsray.models import resolve_model

        req = _parse(T.GetInfoRequest, await body(request), "get_info")
        m = state.model(req.model_id)
        tok = resolve_model(settings.offered[m.base_model]).source
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True, "lora_rank": m.rank, "model_name": m.base_model,
                "model_data": {"arch": "llama", "model_name": m.base_model, "tokenizer_id": tok}}

    # ---------------------------------------------------------------- training
    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request) -> dict:
        if P.PROTO_CONTENT_TYPE not in request.headers.get("content-type", ""):
            raise P.ProtocolError(f"forward_backward: send a protobuf body ({P.PROTO_CONTENT_TYPE}), as the tinker SDK does")
        msg, datums = P.parse_forward_backward(await body(request))
        state.model(msg.model_id)

        async def run() -> bytes:
            out = await state.actor.forward_backward.remote(msg.model_id, datums, msg.forward_only)
            return P.forward_backward_output(out["logprobs"], out["losses"], out["loss_sum"])

        return {"request_id": state.submit_ordered(msg.model_id, msg.seq_id, run), "model_id": msg.model_id}

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request) -> dict:
        req = _parse(T.OptimStepRequest, await body(request), "optim_step")
        if not isinstance(req.optim_params, T.AdamParams):
            raise P.ProtocolError("optim_step: only AdamParams are implemented")
        params = req.optim_params.model_dump()

        async def run() -> dict:
            return {"metrics": await state.actor.optim_step.remote(req.model_id, params)}

        return {"request_id": state.submit_ordered(req.model_id, req.seq_id, run), "model_id": req.model_id}

    def _save(model_id: str, seq_id: int | None, kind: str, name: str, answer: Any) -> dict:
        m = state.model(model_id)
        directory = state.directory(m.model_id, kind, name)

        async def run() -> dict:
            size = await state.actor.save.remote(m.model_id, str(directory), kind == "state")
            return answer(P.tinker_path(m.model_id, kind, name), size)

        return {"request_id": state.submit_ordered(model_id, seq_id, run), "model_id": model_id}

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request) -> dict:
        req = _parse(T.SaveWeightsRequest, await body(request), "save_weights")
        name = req.path or f"step-{uuid.uuid4().hex[:8]}"
        if state.directory(req.model_id, "state", name).exists() and not req.overwrite:
            raise P.ProtocolError(f"save_weights: checkpoint {name!r} exists; pass overwrite=True or choose another name")
        return _save(req.model_id, req.seq_id, "state", name, lambda path, size: {"path": path, "type": "save_weights"})

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_for_sampler(request: Request) -> dict:
        req = _parse(T.SaveWeightsForSamplerRequest, await body(request), "save_weights_for_sampler")
        if req.kind != "snapshot":
            raise P.ProtocolError("save_weights_for_sampler: only kind='snapshot' is implemented")
        if req.path:
            return _save(req.model_id, req.seq_id, "sampler", req.path, lambda path, size: {"path": path})
        name = f"ephemeral-{uuid.uuid4().hex[:12]}"
        base = state.model(req.model_id).base_model

        def answer(path: str, size: int) -> dict:
            return {"sampling_session_id": _new_sampler(path, base)}

        return _save(req.model_id, req.seq_id, "sampler", name, answer)

    @app.post("/api/v1/save_weights_external")
    async def save_external(request: Request) -> dict:
        req = _parse(T.SaveWeightsExternalRequest, await body(request), "save_weights_external")
        if req.age_encryption_recipients:
            raise P.ProtocolError("save_weights_external: age encryption is not implemented by this server")
        return _save(req.model_id, req.seq_id, "external", req.path, lambda path, size: {"path": path, "size_bytes": size})

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request) -> dict:
        from newsray.tinker.server import TrainModel
        from newsray.tinker.worker import ATTN, MLP

        req = _parse(T.LoadWeightsRequest, await body(request), "load_weights")
        directory, meta = state.directory_of(req.path)
        if req.optimizer and not (directory / "optimizer.pt").is_file():
            raise P.ProtocolError(f"load_weights: {req.path} holds no optimizer state (save it with save_state)")
        if req.session_id is not None:  # a new training model from the checkpoint (seq 0 of that model)
            state.session(req.session_id)
            base = req.base_model or meta["base_model"]
            state.check_base(base)
            mid = f"{req.session_id}:train:{req.model_seq_id}"
            targets = set(json.loads((directory / "adapter_config.json").read_text())["target_modules"])
            state.models[mid] = TrainModel(mid, req.session_id, base, meta["rank"])
            state.actor.create_model.remote(mid, base, meta["rank"], None, bool(targets & set(ATTN)), bool(targets & set(MLP)),
                                            "lm_head" in targets)
            ref = state.actor.load.remote(mid, str(directory), req.optimizer)

            async def created() -> dict:
                await ref
                return {"path": req.path, "model_id": mid, "type": "load_weights"}

            return {"request_id": state.submit(created), "model_id": mid}
        if req.model_id is None:
            raise P.ProtocolError("load_weights: give model_id (load into a model) or session_id + model_seq_id (new model)")

        async def run() -> dict:
            out = await state.actor.load.remote(req.model_id, str(directory), req.optimizer)
            return {"path": req.path, "model_id": out["model_id"], "type": "load_weights"}

        return {"request_id": state.submit_ordered(req.model_id, req.seq_id, run), "model_id": req.model_id}

    # ---------------------------------------------------------------- sampling
    def _new_sampler(model_path: str | None, base_model: str | None) -> str:
        directory, adapter = None, None
        if model_path:
            d, meta = state.directory_of(model_path)
            base_model, directory = base_model or meta["base_model"], str(d)
            adapter = "a" + state.sign(directory, str(d.stat().st_mtime_ns))[:16]
        if not base_model:
            raise P.ProtocolError("a sampling session needs model_path or base_model")
        state.check_base(base_model)
        sid = f"sampler-{uuid.uuid4().hex[:16]}"
        state.samplers[sid] = {"base_model": base_model, "adapter": adapter, "directory": directory, "model_path": model_path}
        return sid

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict:
        req = _parse(T.CreateSamplingSessionRequest, await body(request), "create_sampling_session")
        state.session(req.session_id)
        return {"type": "create_sampling_session", "sampling_session_id": _new_sampler(req.model_path, req.base_model)}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str) -> dict:
        s = state.samplers.get(sampler_id)
        if s is None:
            raise P.NotFound(f"unknown sampler {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": s["base_model"], "model_path": s["model_path"]}

    @app.post("/api/v1/asample")
    async def asample(request: Request) -> dict:
        req = _parse(T.SampleRequest, await body(request), "asample")
        sid = req.sampling_session_id or _new_sampler(req.model_path, req.base_model)
        s = state.samplers.get(sid)
        if s is None:
            raise P.NotFound(f"unknown sampling session {sid!r}")
        unsupported = [k for k in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k") if getattr(req, k)]
        if unsupported or req.target_prompt_logprobs is not None or req.prompt_logprobs_last_n is not None:
            raise P.ProtocolError(f"asample: {', '.join(unsupported) or 'target/last-n prompt logprobs'} not implemented by this server")
        if not 1 <= req.num_samples <= 64:
            raise P.ProtocolError("asample: num_samples must be between 1 and 64")
        prompt = req.prompt.to_ints()
        params = req.sampling_params.model_dump()
        ref = state.actor.sample.remote(s["base_model"], s["adapter"], s["directory"], prompt, req.num_samples, params,
                                        bool(req.prompt_logprobs))

        async def run() -> bytes:
            out = await ref
            return P.sample_output(out["sequences"], out["prompt_logprobs"])

        rid = state.submit(run)
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(req.num_samples)]}

    # ---------------------------------------------------------------- futures
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request) -> Any:
        req = _parse(T.FutureRetrieveRequest, await body(request), "retrieve_future")
        status, value = await state.result(req.request_id)
        if status == "pending":
            return {"type": "try_again", "request_id": req.request_id, "queue_state": "active"}
        if status == "error":
            user = any(w in value for w in ("ValueError", "KeyError", "outside the vocabulary", "unknown model"))
            return {"error": value, "category": "user" if user else "server"}
        if isinstance(value, bytes):
            return Response(content=value, media_type=P.PROTO_CONTENT_TYPE)
        return value

    # ---------------------------------------------------------------- external weights (signed downloads)
    @app.get("/api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
    async def external_urls(model_id: str, checkpoint_id: str, request: Request) -> dict:
        segment, _, name = checkpoint_id.partition("/")
        if segment != "external_weights":
            raise P.ProtocolError("external_weights_urls: the checkpoint must be tinker://<run>/external_weights/<name>")
        directory, _meta = state.directory_of(P.tinker_path(model_id, "external", name))
        expires = int(time.time()) + URL_TTL_S
        base = str(request.base_url).rstrip("/")
        urls = {}
        for f in sorted(p for p in directory.iterdir() if p.is_file()):
            sig = state.sign(model_id, name, f.name, str(expires))
            urls[f.name] = f"{base}/api/v1/download/{model_id}/{name}/{f.name}?expires={expires}&sig={sig}"
        return {"urls": urls, "expires": datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()}

    @app.get("/api/v1/download/{model_id}/{name}/{filename}")
    async def download(model_id: str, name: str, filename: str, expires: int, sig: str) -> Any:
        if expires < time.time() or not hmac.compare_digest(sig, state.sign(model_id, name, filename, str(expires))):
            return _json_error(403, "the download URL is invalid or has expired; ask for new external_weights_urls")
        from newsray.tinker.server import _check_name

        path = state.directory(model_id, "external", name) / _check_name(filename)
        if not path.is_file():
            raise P.NotFound(f"no file {filename!r} in external weights {name!r}")
        return FileResponse(path)

    # ---------------------------------------------------------------- everything else the SDK can call
    @app.api_route("/api/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def not_implemented(rest: str, request: Request) -> Any:
        return _json_error(404, f"{request.method} /api/v1/{rest} is not implemented by newsray tinker-server")
