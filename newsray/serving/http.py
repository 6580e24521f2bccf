"""The FastAPI app of the ingress: bearer auth, body limit, routes, and JSON errors for every failure."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from newsray.config import ServeConfig
from newsray.serving.schemas import (
    AnalyzeRequest, AnalyzeResponse, ChatCompletionRequest, ChatCompletionResponse, ClassifyRequest,
    ClassifyResponse, ErrorResponse, ModelCard, ModelList,
)

log = logging.getLogger("ray.serve")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})  # everything else needs the token when auth is on
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 502, 503, 504)}


class Backend(Protocol):
    """What the routes need from the ingress deployment."""

    scfg: ServeConfig
    token: str | None
    default_id: str
    model_ids: list[str]

    async def call(self, model_id: str, request: dict[str, Any]) -> dict[str, Any]: ...

    async def ready(self) -> dict[str, Any]: ...


def error(status: int, kind: str, message: str, raw_text: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The one error shape: {"error": {"type", "message"[, "raw_text"]}}."""
    body: dict[str, Any] = {"type": kind, "message": message}
    if raw_text is not None:
        body["raw_text"] = raw_text
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def token_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (constant-time comparison)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def route_path(scope: dict) -> str:
    """The path below the app's route prefix (Serve sets root_path to it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class Guard:
    """ASGI middleware: 401 without the bearer token (all but /healthz, /readyz), 413 above the body limit.

    The body is buffered (at most max_bytes + 1 bytes are read) and replayed to the app, so a
    chunked upload without Content-Length is bounded too. The token is never logged.
    """

    def __init__(self, app: Any, token: str | None, max_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is not None and route_path(scope) not in PUBLIC_PATHS and not token_matches(headers.get("authorization"), self.token):
            resp = error(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer <token>'.",
                         headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        too_big = error(413, "request_too_large", f"the request body exceeds {self.max_bytes} bytes (serve.max_body_bytes).")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(parts) + "."


def _budget(scfg: ServeConfig, requested: int | None, field: str) -> int | JSONResponse:
    if requested is None:
        return scfg.max_new_tokens
    if requested > scfg.max_new_tokens:
        return error(422, "invalid_request", f"{field}: at most {scfg.max_new_tokens} (serve.max_new_tokens), got {requested}.")
    return requested


def _model(backend: Backend, requested: str | None) -> str | JSONResponse:
    model_id = requested or backend.default_id
    if model_id not in backend.model_ids:
        shown = json.dumps(model_id[:80])
        return error(404, "model_not_found", f"model {shown} is not served; GET /v1/models lists: {', '.join(backend.model_ids)}.")
    return model_id


def _too_long(scfg: ServeConfig, **fields: str) -> JSONResponse | None:
    for name, text in fields.items():
        if len(text) > scfg.max_content_chars:
            return error(422, "content_too_long", f"{name} has {len(text)} characters; the limit is {scfg.max_content_chars} (serve.max_content_chars).")
    return None


async def _dispatch(backend: Backend, model_id: str, request: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """Call the model deployment; its error outcomes become JSON errors."""
    out = await backend.call(model_id, request)
    if "error" in out:
        e = out["error"]
        retry = {"Retry-After": "5"} if e["status"] == 503 else None  # replica restarting / model loading: retryable
        return error(e["status"], e["type"], e["message"], e.get("raw_text"), headers=retry)
    return out


def make_api(backend: Backend) -> FastAPI:
    """The ingress app: /healthz, /readyz, /v1/analyze, /v1/classify, /v1/models, /v1/chat/completions."""
    scfg = backend.scfg
    app = FastAPI(title="newsray", description="News analysis with LoRA adapters on Ray Serve.", version="1")
    app.add_middleware(Guard, token=backend.token, max_bytes=scfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}
        return error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail).rstrip(".") + ".", headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
        return error(500, "internal_error", f"the server failed ({type(exc).__name__}); see the Serve replica logs.")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Any:
        """Readiness: a model replica answers and has its default model loaded."""
        try:
            return {"status": "ready", **await backend.ready()}
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"
            return error(503, "not_ready", f"no model replica is ready ({type(e).__name__}); retry shortly.", headers={"Retry-After": "5"})

    async def _item(kind: str, req: AnalyzeRequest | ClassifyRequest) -> dict[str, Any] | JSONResponse:
        """Check and run one analyze/classify request; the answer fields plus latency, or a JSON error."""
        t0 = time.perf_counter()
        model_id, budget = _model(backend, req.model), _budget(scfg, req.max_new_tokens, "max_new_tokens")
        for check in (model_id, budget, _too_long(scfg, title=req.title, content=req.content)):
            if isinstance(check, JSONResponse):
                return check
        out = await _dispatch(backend, model_id, {"kind": kind, "fields": {"title": req.title, "content": req.content}, "max_new_tokens": budget})
        return out if isinstance(out, JSONResponse) else out | {"latency_ms": (time.perf_counter() - t0) * 1000}

    @app.post("/v1/analyze", response_model=AnalyzeResponse, responses=ERRORS)
    async def analyze(req: AnalyzeRequest) -> Any:
        """A newsletter item -> relevance 1-10, summary, key insights, company names (always schema-valid)."""
        out = await _item("analyze", req)
        return out if isinstance(out, JSONResponse) else AnalyzeResponse(**out)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(req: ClassifyRequest) -> Any:
        """An AG News item -> World, Sports, Business or Sci/Tech (AG News adapters)."""
        out = await _item("classify", req)
        return out if isinstance(out, JSONResponse) else ClassifyResponse(**out)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        """The served model ids (OpenAI shape); the first is the default."""
        return ModelList(data=[ModelCard(id=m) for m in backend.model_ids])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat(req: ChatCompletionRequest) -> Any:
        """OpenAI-compatible chat completion (greedy; json_object/json_schema formats use the task's grammar)."""
        model_id, budget = _model(backend, req.model), _budget(scfg, req.budget(), "max_tokens")
        for check in (model_id, budget):
            if isinstance(check, JSONResponse):
                return check
        json_mode = req.response_format is not None and req.response_format.type != "text"
        out = await _dispatch(backend, model_id, {
            "kind": "chat", "messages": [{"role": m.role, "content": m.text()} for m in req.messages],
            "max_new_tokens": budget, "json_mode": json_mode, "stops": req.stops()})
        if isinstance(out, JSONResponse):
            return out
        return ChatCompletionResponse.model_validate({
            "model": model_id, "usage": out["usage"], "system_fingerprint": out.get("model_ref"),
            "choices": [{"message": {"content": out["text"]}, "finish_reason": out["finish_reason"]}]})

    return app
