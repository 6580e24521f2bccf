"""Ray Serve deployment: a FastAPI ingress and continuously batched, multiplexed model replicas; `build_app` and `run`.

The ingress (`Ingress`, no CPU reserved) checks auth and limits, validates requests and calls the
model deployment (`ModelServer`) through a handle, choosing the adapter with
`multiplexed_model_id`. Each model replica keeps the default model pinned, loads extra adapters
into Serve's per-replica LRU (`serve.multiplexed`, serve.max_loaded_adapters) and hands every
request to its model's engine (`newsray.generation.Generator.agenerate`): a request joins the
running batch at the engine's next step, up to serve.max_batch_size rows, instead of waiting for
a batch to form and finish. Prompts come from the task module and `newsray.formatting`, exactly as
in training.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from newsray.config import Config, DataConfig, ServeConfig, load_config
from newsray.errors import ConfigError, GenerationError, ModelError, NewsrayError
from newsray.serving import on_cluster
from newsray.tasks import TASKS, serve_task, task_type

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica logs with request ids

APP_NAME = "newsray"
MODEL_DEPLOYMENT = "NewsrayModel"
INGRESS_DEPLOYMENT = "NewsrayIngress"
ENDPOINT = {name: f"/v1/{task_type(name).serve_kind}" for name in TASKS}
_FINISH = {"stop": "stop", "json_end": "stop", "length": "length", "error": "stop"}


# ------------------------------------------------------------------ driver-side helpers


def resolve_token(scfg: ServeConfig) -> str | None:
    """The bearer token: $<serve.auth_token_env>, else the serve.auth_token_file; None = no auth."""
    if not (scfg.auth_token_env or scfg.auth_token_file):
        return None
    token = (os.environ.get(scfg.auth_token_env) or "").strip() if scfg.auth_token_env else ""
    if not token and scfg.auth_token_file:
        path = Path(scfg.auth_token_file)
        if not path.is_file():
            raise ConfigError(f"serve.auth_token_file: {path} does not exist; create it with the token, or unset it.")
        token = path.read_text(encoding="utf-8").strip()
    if not token:
        where = " or ".join(x for x in (scfg.auth_token_env and f"${scfg.auth_token_env}", scfg.auth_token_file) if x)
        raise ConfigError(f"serve auth is configured but {where} holds no token; set it (e.g. export {scfg.auth_token_env or 'TOKEN'}=...) "
                          "or set serve.auth_token_env and serve.auth_token_file to null.")
    return token


def _normalize_ref(ref: str, where: str) -> str:
    """baseline and MLflow URIs unchanged; a local adapter directory made absolute and checked."""
    from newsray.generation import ADAPTER_CONFIG, BASELINE, MLFLOW_SCHEMES

    ref = ref.strip()
    if ref == BASELINE or ref.startswith(MLFLOW_SCHEMES):
        return ref
    path = Path(ref).expanduser().resolve()
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{where}: {path} is not a PEFT adapter directory (no {ADAPTER_CONFIG}); use baseline, "
                         "an adapter directory or an MLflow URI (runs:/..., models:/name@alias).")
    return str(path)


def resolve_models(cfg: Config, model_ref: str) -> tuple[str, dict[str, str]]:
    """(default model id, {id: model_ref}) from --model and serve.adapters; ids are what requests name.

    A registry alias (models:/name@champion) is pinned here, once, to the version it points at
    (newsray.registry.pin_alias): replicas started later load that version too; the id stays the alias's.
    """
    from newsray.generation import model_slug
    from newsray.registry import pin_alias

    default_id = cfg.serve.model_name or model_slug(model_ref)
    refs = {default_id: pin_alias(cfg, _normalize_ref(model_ref, "--model"))}
    for model_id, ref in cfg.serve.adapters.items():
        if model_id in refs:
            raise ConfigError(f"serve.adapters: id {model_id!r} is already the default model's id; choose another id.")
        refs[model_id] = pin_alias(cfg, _normalize_ref(ref, f"serve.adapters.{model_id}"))
    return default_id, refs


# ------------------------------------------------------------------ model replicas


@dataclass
class Loaded:
    """A loaded model, the task it answers and that task's prompt builder."""

    generator: Any
    task: str
    prompt: Callable[..., str]
    unload: Callable[[], None] | None = None  # frees a shared-base adapter's weights

    def __del__(self) -> None:
        """Serve calls this when its LRU evicts the model (and Python again at collection: once is enough)."""
        unload, self.unload = self.unload, None
        if unload is not None:
            try:
                unload()
            except Exception:
                log.exception("unloading an adapter failed")


def _err(status: int, kind: str, message: str, raw_text: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "type": kind, "message": message, "raw_text": raw_text}}


def _adapter_task(adapter_dir: Path | None, default: str) -> str:
    """The task an adapter was trained for (its newsray_config.yaml), else the serving config's."""
    path = adapter_dir / "newsray_config.yaml" if adapter_dir else None
    try:
        task = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("task") if path and path.is_file() else None
    except (OSError, yaml.YAMLError, AttributeError):
        task = None
    return task if task in ENDPOINT else default


class ModelServer:
    """A model replica: the default model pinned, extra adapters in an LRU, continuously batched greedy decoding."""

    def __init__(self, cfg_data: dict[str, Any], refs: dict[str, str], default_id: str):
        self.cfg = Config.model_validate(cfg_data)
        self.refs, self.default_id = refs, default_id
        self.device = "cuda" if self.cfg.serve.gpus_per_replica > 0 else "cpu"
        self.slots = self.cfg.serve.max_batch_size
        self._generators: list[Any] = []  # every loaded model's generator (their engines follow reconfigure)
        self._pools: dict[str, Any] = {}  # base model name -> SharedBase of the multiplexed adapters
        self.default = self._load(default_id)

        async def load_adapter(model_id: str) -> Loaded:
            return await asyncio.to_thread(self._load, model_id)

        self._load_adapter = load_adapter  # Serve keeps its LRU on this function object
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_loaded_adapters)(load_adapter)
        self.reconfigure({})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Rows decoded together (serve.max_batch_size, or a Serve config's user_config max_batch_size): live, no restart."""
        self.slots = int(user_config.get("max_batch_size", self.cfg.serve.max_batch_size))
        for gen in self._generators:
            gen.slots = self.slots
            gen.engine.set_slots(self.slots)

    def _load(self, model_id: str) -> Loaded:
        from newsray.generation import SharedBase, load_generator
        from newsray.serving import served_spec
        from newsray.tasks import get_task

        ref = self.refs[model_id]
        spec = served_spec(ref, self.cfg, self.device)
        task = _adapter_task(spec.adapter_dir, self.cfg.data.task)
        cfg = self.cfg.model_copy(update={"data": DataConfig(task=task)})
        prompt = get_task(cfg).make_user_prompt
        if model_id != self.default_id and spec.adapter_dir is not None and self.cfg.serve.share_base:
            pool = self._pools.setdefault(spec.model.name, SharedBase(self.device))
            gen = pool.add(model_id, spec, task, slots=self.slots)
            log.info("adapter %s (%s, task %s) loaded on the shared %s (%s)", model_id, ref, task, spec.model.name, spec.model.dtype)
            self._generators.append(gen)
            return Loaded(gen, task, prompt, unload=lambda: self._unload(gen, lambda: pool.remove(model_id)))
        gen = load_generator(ref, cfg, device=self.device, num_threads=self.cfg.serve.cpus_per_replica, spec=spec, slots=self.slots)
        log.info("model %s (%s, task %s) loaded in %s, %d rows decoded together", model_id, ref, task, spec.model.dtype, self.slots)
        self._generators.append(gen)
        return Loaded(gen, task, prompt, unload=lambda: self._unload(gen))

    def _unload(self, gen: Any, then: Callable[[], None] | None = None) -> None:
        """An evicted model: its engine is no longer reconfigured; a shared-base adapter frees its weights."""
        if gen in self._generators:
            self._generators.remove(gen)
        gen.engine.close()
        if then is not None:
            then()

    async def _model(self, model_id: str) -> Loaded:
        return self.default if model_id == self.default_id else await self._adapter(model_id)

    async def ready(self) -> dict[str, Any]:
        """Which models this replica holds (the default is always loaded)."""
        wrapper = getattr(self._load_adapter, "__serve_multiplex_wrapper", None)
        loaded = list(getattr(wrapper, "models", {}) or {})
        return {"default_model": self.default_id, "loaded_models": [self.default_id, *loaded]}

    async def respond(self, model_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """One request -> {answer fields} or {"error": {status, type, message[, raw_text]}}."""
        try:
            loaded = await self._model(model_id)
        except NewsrayError as e:
            return _err(503, "model_unavailable", f"model {model_id!r} cannot be loaded: {e}")
        kind, budget = request["kind"], int(request["max_new_tokens"])
        if kind == "chat":
            messages = request["messages"]
            constrained = bool(request.get("json_mode")) and task_type(loaded.task).json_stop
        else:
            want = serve_task(kind)
            if task_type(loaded.task).serve_kind != kind:
                return _err(422, "wrong_task", f"model {model_id!r} answers the {loaded.task} task: use {ENDPOINT[loaded.task]} "
                            f"or a model of the {want} task (GET /v1/models).")
            messages = [{"role": "user", "content": loaded.prompt(**request["fields"])}]
            constrained = self.cfg.serve.constrained
        formatter = loaded.generator.formatter
        n_prompt = len(formatter.prompt_ids(messages))
        if n_prompt + budget > formatter.max_seq_length:
            return _err(422, "prompt_too_long", f"the prompt has {n_prompt} tokens; with max_new_tokens={budget} it exceeds "
                        f"the model's {formatter.max_seq_length}-token window (model.max_seq_length): shorten the input.")
        try:
            result = await loaded.generator.agenerate(messages, budget, constrained)
            if result.finish_reason == "error" and kind == "chat":
                return _err(502, "generation_failed", f"model {model_id!r}: {result.error}", raw_text=result.text)
        except GenerationError as e:  # the grammar cannot be built for this model's tokenizer
            return _err(502, "generation_failed", f"model {model_id!r}: {e}")
        if kind == "chat":
            text, reason = _apply_stops(result.text, request.get("stops") or [], _FINISH[result.finish_reason])
            usage = {"prompt_tokens": n_prompt, "completion_tokens": result.n_new_tokens, "total_tokens": n_prompt + result.n_new_tokens}
            return {"text": text, "finish_reason": reason, "usage": usage, "model_ref": self.refs[model_id]}
        answer = _validate(kind, result.text)
        if answer is None and not constrained and self.cfg.serve.retry_constrained:
            constrained = True
            try:
                result = await loaded.generator.agenerate(messages, budget, True)
            except GenerationError as e:
                return _err(502, "generation_failed", f"model {model_id!r}: {e}")
            answer = _validate(kind, result.text)
        if answer is None and result.finish_reason == "error":
            return _err(502, "generation_failed", f"model {model_id!r}: {result.error}", raw_text=result.text)
        if answer is None:
            what = "JSON answer matching the news schema" if kind == "analyze" else "AG News label"
            return _err(502, "invalid_model_output", f"model {model_id!r} did not produce a valid {what} within "
                        f"{budget} new tokens (finish_reason={result.finish_reason}); raw_text holds its output.", raw_text=result.text)
        return {**answer, "model": model_id, "model_ref": self.refs[model_id], "finish_reason": _FINISH[result.finish_reason],
                "constrained": constrained}


def _validate(kind: str, text: str) -> dict[str, Any] | None:
    """The task's parse rule: a NewsAnswer dict, {"label": ...}, or None when invalid."""
    return task_type(serve_task(kind)).serve_answer(text)


def _apply_stops(text: str, stops: list[str], reason: str) -> tuple[str, str]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, reason)


# ------------------------------------------------------------------ ingress


class Ingress:
    """The HTTP entry point (FastAPI app from newsray.serving.http, built per replica)."""

    def __init__(self, model: Any, serve_cfg: dict[str, Any], default_id: str, model_ids: list[str]):
        self.model, self.scfg = model, ServeConfig.model_validate(serve_cfg)
        self.default_id, self.model_ids = default_id, model_ids
        self._handles: dict[str, Any] = {}
        self.token = resolve_token(self.scfg)  # fails the replica (fail closed) if auth is configured but unset

    def __serve_build_asgi_app__(self) -> Any:
        from newsray.serving.http import make_api

        return make_api(self)

    async def call(self, model_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """The model deployment's answer; a replica that is gone or restarting is a retryable 503, no answer
        within serve.request_timeout_s a 504 (the request is cancelled: its engine slot is freed)."""
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError

        if model_id not in self._handles:
            self._handles[model_id] = self.model if model_id == self.default_id else self.model.options(multiplexed_model_id=model_id)
        handle = self._handles[model_id]
        response = handle.respond.remote(model_id, request)
        try:
            return await asyncio.wait_for(response, timeout=self.scfg.request_timeout_s)
        except BackPressureError:
            return _err(503, "overloaded", "every model replica is busy and the queue for them is full "
                        "(serve.max_ongoing_requests, serve.max_queued_requests); retry shortly.")
        except TimeoutError:
            response.cancel()
            return _err(504, "timeout", f"no answer within {self.scfg.request_timeout_s:g} s (serve.request_timeout_s); "
                        "the request was cancelled: retry later or with a smaller max_new_tokens.")
        except RayTaskError:
            raise  # the replica's own code failed (respond turns user errors into answers): a bug, a 500
        except Exception as e:  # noqa: BLE001 - the replica, its node or the channel to it went away mid-request
            # ActorDiedError / ActorUnavailableError / ReplicaUnavailableError / DeploymentUnavailableError, and what
            # else a dying node may give (a gRPC error, a lost object, a crashed worker): retryable, never a 500
            # (CI's node-kill run met 2 x 500 when only the actor errors were caught)
            log.warning("model replica unavailable: %s: %s", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return _err(503, "replica_unavailable", "the model replica died or is restarting; retry shortly.")

    async def ready(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.model.ready.remote(), timeout=5)


IngressDeployment = serve.deployment(serve.ingress()(Ingress), name=INGRESS_DEPLOYMENT)
ModelDeployment = serve.deployment(ModelServer, name=MODEL_DEPLOYMENT)


# ------------------------------------------------------------------ building and running


def build_app(cfg: Config, model_ref: str) -> Any:
    """The Serve application (ingress -> model deployment) for `model_ref` plus serve.adapters;
    with serve.engine=vllm (GPU replicas) Ray Serve LLM's OpenAI app instead (newsray.generation.vllm)."""
    from newsray.generation import vllm

    s = cfg.serve
    if vllm.choose(s.engine, s.gpus_per_replica) == "vllm":
        return vllm.build_serve_app(cfg, model_ref)
    default_id, refs = resolve_models(cfg, model_ref)
    resolve_token(s)  # fail early, in the driver, if auth is configured but the token is missing
    scaling: dict[str, Any] = {"num_replicas": s.num_replicas}
    if s.max_replicas is not None:
        scaling = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": s.num_replicas, "max_replicas": s.max_replicas, "target_ongoing_requests": s.target_ongoing_requests}}
    model = ModelDeployment.options(
        **scaling, ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        max_ongoing_requests=s.max_ongoing_requests or max(32, 4 * s.max_batch_size), max_queued_requests=s.max_queued_requests or -1,
        health_check_period_s=5, graceful_shutdown_timeout_s=30,
    ).bind(cfg.model_dump(mode="json"), refs, default_id)
    return IngressDeployment.options(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024).bind(
        model, s.model_dump(mode="json"), default_id, list(refs))


class AppArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of a Serve config YAML)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="A newsray config YAML on the cluster (None = built-in defaults).")
    model: str = Field("baseline", description="baseline, an adapter directory or an MLflow URI (models:/name@alias).")
    overrides: list[str] = Field(default_factory=list, description="section.key=value overrides.")


def app_builder(args: dict[str, Any]) -> Any:
    """Serve import target for `serve run` / `serve deploy`: newsray.serving.app:app_builder."""
    a = AppArgs.model_validate(args)
    return build_app(load_config(a.config, a.overrides), a.model)


def _startup_error(exc: Exception) -> NewsrayError:
    """The user-facing sentence inside a failed deployment's traceback, as a ModelError."""
    text = str(exc)
    found = re.findall(r"newsray\.errors\.\w+Error: (.+)", text)
    return ModelError(f"the Serve app failed to start: {found[-1] if found else text.strip().splitlines()[-1][:500]}")


def shutdown(cfg: Config) -> None:
    """Remove the app: on a cluster only this app, in-process all of Serve and Ray."""
    import ray

    if not ray.is_initialized():
        return
    if on_cluster(cfg):
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
    ray.shutdown()


def _check_running_http(cfg: Config) -> None:
    """Serve's HTTP host and port are fixed when Serve starts on a cluster: `serve.start` keeps those of a Serve
    already running there (Ray only logs a warning), so the app would answer on another port than serve.port.
    Refuse in one sentence instead (measured: a test deploying on a new port met 180 s of refused connections)."""
    import ray
    from ray.serve.context import _get_global_client

    http, s = _get_global_client().http_config, cfg.serve
    if (http.host, http.port) != (s.host, s.port):
        ray.shutdown()  # disconnect only: the running Serve and its apps are someone's
        raise ConfigError(f"Serve already runs on this Ray cluster with HTTP on {http.host}:{http.port}, fixed when it started, so "
                          f"serve.host/serve.port {s.host}:{s.port} cannot apply: set serve.host={http.host} serve.port={http.port}, or end "
                          "that Serve first (`serve shutdown`, which removes its apps).")


def run(cfg: Config, model_ref: str, blocking: bool = True, on_ready: Callable[[str], None] | None = None,
        detach: bool = False) -> str:
    """Start the app (in-process Ray, or the cluster of ray.address) and return its URL.

    blocking: call `on_ready(url)`, then serve until Ctrl-C / SIGTERM and shut down cleanly.
    detach: on a cluster, deploy and return; the app keeps running there (`serve shutdown` ends it).
    """
    from newsray.raycluster import init_ray

    if detach and not on_cluster(cfg):
        raise ConfigError("--detach needs a running cluster (ray.address or $RAY_ADDRESS): an in-process Ray ends with this command.")
    app = build_app(cfg, model_ref)
    init_ray(cfg, stage="serve")
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    _check_running_http(cfg)
    t0 = time.perf_counter()
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:
        shutdown(cfg)
        raise _startup_error(e) from None
    url = f"http://{s.host}:{s.port}"
    log.info("newsray serving %s at %s (ready in %.1fs)", model_ref, url, time.perf_counter() - t0)
    if not blocking or detach:
        return url
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C
    try:
        if on_ready:
            on_ready(url)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown(cfg)
    return url
