"""The tinker backend: the training loop runs here, the GPU work at a Tinker service (the official SDK).

The service is Thinking Machines' managed API or `newsray tinker-server`. The driver keeps the data
and the schedule: every step sends newsray's own token rows as Datums (`weights` 1 exactly on the
answer plus its end-of-turn token, as the hf backend's labels), submits the next forward_backward
and optim_step before waiting for the previous (the cookbook's pipelining), logs loss / lr /
tokens-per-second to the MLflow run, saves the service-side state every checkpoint_every_steps
(resumable with the optimizer state), and at the end exports the weights as a PEFT adapter directory
that evaluate / serve / register / compare take like the hf backend's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from newsray.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

    from newsray.config import Config
    from newsray.train.data import TrainData

SDK_PIN = "0.38.0"
INSTALL = f"pip install tinker=={SDK_PIN} (or pip install -e '.[tinker]')"
STATE_FILE = "tinker_state.json"
LOCAL_CHECKPOINT = "tinker_checkpoint_{:06d}"
ATTN, MLP = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
TINKER_LORA_ALPHA = 32  # the service's LoRA alpha, whatever the rank


def api_key(cfg: Config) -> str:
    """$TINKER_API_KEY, else the contents of tinker.api_key_file (never logged)."""
    key = os.environ.get("TINKER_API_KEY", "").strip()
    if not key and cfg.tinker.api_key_file:
        try:
            key = Path(cfg.tinker.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"tinker.api_key_file: cannot read {cfg.tinker.api_key_file} ({e.strerror or e}).") from None
    if not key:
        raise ConfigError("train.backend=tinker needs an API key: set $TINKER_API_KEY or tinker.api_key_file.")
    return key


def base_url(cfg: Config) -> str:
    from tinker.lib.base_url import resolve_base_url

    return resolve_base_url(cfg.tinker.base_url or os.environ.get("TINKER_BASE_URL") or None)


def service_model(cfg: Config) -> str:
    return cfg.tinker.base_model or cfg.model.name


def probe(cfg: Config, url: str, key: str) -> list[str]:
    """Reachable (health within connect_timeout_s), key accepted, model offered; returns the offered models."""
    import httpx
    import tinker

    try:
        httpx.get(f"{url}/api/v1/healthz", timeout=cfg.tinker.connect_timeout_s)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach the Tinker service at {url} within {cfg.tinker.connect_timeout_s:g} s "
                          f"({type(e).__name__}); check tinker.base_url / $TINKER_BASE_URL and the network.") from None
    try:
        caps = tinker.RestClient(base_url=url, api_key=key).get_server_capabilities().result()
    except (tinker.AuthenticationError, tinker.PermissionDeniedError):
        raise ConfigError(f"the Tinker service at {url} refused the API key (401); check $TINKER_API_KEY / tinker.api_key_file.") from None
    except tinker.TinkerError as e:
        raise ConfigError(f"the Tinker service at {url} refused the connection: {str(e).splitlines()[0]}") from None
    offered = [m.model_name for m in caps.supported_models if m.model_name and m.trainable is not False]
    if service_model(cfg) not in offered:
        raise ConfigError(f"the Tinker service at {url} does not offer {service_model(cfg)!r} (tinker.base_model / model.name); "
                          f"it offers: {', '.join(offered) or 'nothing'}.")
    return offered


def default_learning_rate(cfg: Config) -> tuple[float, str]:
    """(peak learning rate, where it came from): tinker-cookbook's get_lr for the service model, or train.learning_rate.

    tinker.cookbook_lr: true = the cookbook's where it knows the model; false = the config's;
    None = the cookbook's only when the config does not set train.learning_rate.
    """
    use = cfg.tinker.cookbook_lr if cfg.tinker.cookbook_lr is not None else "learning_rate" not in cfg.train.model_fields_set
    if not use:
        return cfg.train.learning_rate, "config"
    if importlib.util.find_spec("tinker_cookbook") is None:
        return cfg.train.learning_rate, "config (tinker-cookbook not installed)"
    try:
        from tinker_cookbook.hyperparam_utils import get_lr

        return float(get_lr(service_model(cfg))), "tinker_cookbook.hyperparam_utils.get_lr"
    except Exception as e:  # noqa: BLE001 - the cookbook raises for models it has no formula for
        return cfg.train.learning_rate, f"config (get_lr: {type(e).__name__})"


def lora_flags(cfg: Config) -> dict[str, bool]:
    """Tinker's LoRA targets from lora.target_modules (attention and/or MLP projections; no unembedding)."""
    targets = set(cfg.lora.target_modules)
    unknown = targets - ATTN - MLP
    if unknown:
        raise ConfigError(f"lora.target_modules: Tinker trains whole groups (attention, MLP); {sorted(unknown)} cannot be chosen.")
    return {"train_attn": bool(targets & ATTN), "train_mlp": bool(targets & MLP), "train_unembed": False}


def datum(row: dict[str, list[int]]) -> Any:
    """A newsray token row -> a Tinker Datum: inputs ids[:-1], targets ids[1:], weight 1 where labels[1:] is kept."""
    from tinker import types

    from newsray.formatting import IGNORE_INDEX

    ids, labels = row["input_ids"], row["labels"]
    n = len(ids) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={
        "target_tokens": types.TensorData(data=ids[1:], dtype="int64", shape=[n]),
        "weights": types.TensorData(data=[1.0 if lab != IGNORE_INDEX else 0.0 for lab in labels[1:]], dtype="float32", shape=[n])})


class TinkerBackend:
    """Trains at a Tinker service; there is no local model, so setup_worker/build are never called."""

    name = "tinker"
    remote = True

    def preflight(self, cfg: Config) -> None:
        if importlib.util.find_spec("tinker") is None:
            raise ConfigError(f"train.backend=tinker needs the Tinker SDK: run `{INSTALL}`.")
        if cfg.train.deepspeed or cfg.model.load_in_4bit:
            raise ConfigError("train.deepspeed and model.load_in_4bit do not apply to train.backend=tinker (the service owns the GPUs); remove them.")
        if cfg.train.optimizer != "adamw_torch":
            raise ConfigError(f"train.optimizer={cfg.train.optimizer}: the Tinker service's optimizer is AdamW; set train.optimizer=adamw_torch.")
        lora_flags(cfg)
        probe(cfg, base_url(cfg), api_key(cfg))

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        raise ConfigError("train.backend=tinker trains at the Tinker service, not in Ray Train workers.")

    def build(self, cfg: Config, device: torch.device) -> Any:
        raise ConfigError("train.backend=tinker trains at the Tinker service, not in Ray Train workers.")


def _lr_schedule(cfg: Config, peak: float, max_steps: int) -> list[float]:
    """The learning rate of every step from newsray's schedule (warm-up + linear/cosine/constant)."""
    import torch

    from newsray.train.optim import build_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = build_scheduler(cfg, opt, max_steps)
    out = []
    for _ in range(max_steps):
        out.append(float(sched.get_last_lr()[0]))
        opt.step()
        sched.step()
    return out


def _latest_state(run_dir: Path) -> dict[str, Any] | None:
    found = [json.loads(p.read_text()) for p in run_dir.glob(f"tinker_checkpoint_*/{STATE_FILE}")]
    return max(found, key=lambda s: s["step"]) if found else None


def train_remote(cfg: Config, data: TrainData, run_dir: Path, mlflow: dict[str, str] | None, max_steps: int) -> tuple[Path, dict[str, float]]:
    """The whole run at the service; returns (the exported adapter directory, the last step's metrics)."""
    import tinker

    from newsray.models import load_tokenizer
    from newsray.train import checkpoint as ck
    from newsray.train.data import ShardedBatches
    from newsray.train.loop import KILL_ENV, _maybe_kill, _MlflowLogger

    url, key = base_url(cfg), api_key(cfg)
    peak, lr_source = default_learning_rate(cfg)
    lrs = _lr_schedule(cfg, peak, max_steps)
    log = _MlflowLogger(mlflow, 0)
    if log.client is not None:
        log.client.log_param(log.run_id, "derived.learning_rate", peak)
        log.client.set_tag(log.run_id, "newsray.learning_rate_source", lr_source)
        log.client.set_tag(log.run_id, "newsray.tinker_base_url", url)
    batches = ShardedBatches(data.train, cfg.train.per_device_batch_size * cfg.train.grad_accum_steps, 0, 1, cfg.train.seed,
                             data.pad_id, group_by_length=cfg.train.group_by_length)
    state = ck.TrainerState(max_steps=max_steps, micro_batches_per_epoch=batches.per_epoch, seed=cfg.train.seed,
                            run_name=cfg.train.run_name or "", backend="tinker", versions={"tinker": tinker.__version__})
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = _latest_state(run_dir) if cfg.train.resume else None
    service = tinker.ServiceClient(base_url=url, api_key=key, user_metadata={"newsray_run": cfg.train.run_name or ""})
    status = "errored"
    try:
        if resume:
            tc = service.create_training_client_from_state_with_optimizer(resume["state_path"]).result()
            state.global_step, state.log_history = resume["step"], resume["log_history"]
            state.resumed_from_steps = resume["resumed_from_steps"] + [resume["step"]]
            log.log({"resumed_from_step": state.global_step}, state.global_step)
        else:
            tc = service.create_lora_training_client(base_model=service_model(cfg), rank=cfg.lora.r, seed=cfg.train.seed,
                                                     **lora_flags(cfg)).result()
        print(f"newsray: training at {url} (model {service_model(cfg)}, lr {peak:g} from {lr_source})", file=sys.stderr)
        last: dict[str, float] = {}
        pending: tuple | None = None
        t_prev = time.perf_counter()

        def finish(p: tuple) -> None:
            nonlocal last, t_prev
            step, fb, opt, n_tokens, n_weighted, lr = p
            out, _ = fb.result(), opt.result()
            now = time.perf_counter()
            elapsed, t_prev = now - t_prev, now
            state.global_step = step
            state.micro_batches_seen = step
            state.epoch = step / max(1, batches.per_epoch)
            last = {"step": step, "epoch": round(state.epoch, 4), "loss": out.metrics["loss:sum"] / max(n_weighted, 1.0),
                    "lr": lr, "tokens_per_s": n_tokens / max(elapsed, 1e-9), "step_time_s": elapsed}
            state.log_history.append({k: last[k] for k in ("step", "epoch", "loss", "lr", "tokens_per_s")})
            log.log({k: v for k, v in last.items() if k != "step"}, step)

        for step in range(state.global_step, max_steps):
            rows = [data.train[i] for i in batches.indices(step)]
            datums = [datum(r) for r in rows]
            fb = tc.forward_backward(datums, "cross_entropy")
            opt = tc.optim_step(tinker.AdamParams(learning_rate=lrs[step], beta1=0.9, beta2=0.999, eps=1e-8,
                                                  weight_decay=cfg.train.weight_decay))
            if pending is not None:
                finish(pending)  # the previous step's results, awaited after this step was submitted
            n_weighted = sum(float(sum(d.loss_fn_inputs["weights"].data)) for d in datums)
            pending = (step + 1, fb, opt, sum(len(r["input_ids"]) for r in rows), n_weighted, lrs[step])
            if (step + 1) % cfg.train.checkpoint_every_steps == 0 and step + 1 < max_steps:
                finish(pending)
                pending = None
                _save_state(tc, run_dir, state)
                _maybe_kill(os.environ.get(KILL_ENV), state.global_step, 0)
        if pending is not None:
            finish(pending)
        adapter_dir = _export(cfg, tc, url, key, run_dir, state, load_tokenizer(cfg.model))
        status = "success"
        return adapter_dir, last
    except BaseException as e:
        status = "errored" if isinstance(e, Exception) else "interrupted"
        raise
    finally:
        try:
            service.close(status).result(timeout=30)  # ends the session at the service (frees its models)
        except Exception as e:  # noqa: BLE001 - the run's outcome is already decided; say it and go on
            print(f"newsray: could not close the Tinker session ({type(e).__name__})", file=sys.stderr)


def _save_state(tc: Any, run_dir: Path, state: Any) -> None:
    """Service-side state (weights + optimizer) and a local record of it for train.resume."""
    path = tc.save_state(f"step-{state.global_step:06d}").result().path
    d = run_dir / LOCAL_CHECKPOINT.format(state.global_step)
    d.mkdir(parents=True, exist_ok=True)
    (d / STATE_FILE).write_text(json.dumps({"step": state.global_step, "state_path": path, "log_history": state.log_history,
                                            "resumed_from_steps": state.resumed_from_steps}, indent=2) + "\n")


def _export(cfg: Config, tc: Any, url: str, key: str, run_dir: Path, state: Any, tokenizer: Any) -> Path:
    """Sampler weights at the service, and the weights downloaded as a local PEFT adapter directory."""
    import httpx
    import tinker

    from newsray.train import checkpoint as ck

    name = f"{cfg.train.run_name or 'newsray'}-step-{state.global_step:06d}"[:128]
    sampler_path = tc.save_weights_for_sampler(name).result().path
    external = tc.save_weights_external(name).result().path
    urls = tinker.RestClient(base_url=url, api_key=key).get_external_weights_urls(external).result().urls
    out = run_dir / f"checkpoint_{state.global_step:06d}"
    out.mkdir(parents=True, exist_ok=True)
    for fname, link in sorted(urls.items()):
        target = (out / fname).resolve()
        if not target.is_relative_to(out.resolve()):
            raise ModelError(f"the Tinker service sent an unsafe file name {fname!r} for {external}.")
        target.parent.mkdir(parents=True, exist_ok=True)
        with httpx.stream("GET", link, timeout=300, follow_redirects=True) as r:
            r.raise_for_status()
            with open(target, "wb") as f:
                f.writelines(r.iter_bytes())
    if not all((out / f).is_file() for f in ck.ADAPTER_FILES):
        raise ModelError(f"the external weights {external} are not a PEFT adapter ({', '.join(sorted(urls))}); convert them with "
                         "tinker_cookbook.weights.build_lora_adapter and pass the result to newsray evaluate.")
    saved = cfg.model_copy(deep=True)
    saved.lora.alpha, saved.lora.dropout = TINKER_LORA_ALPHA, 0.0
    tokenizer.save_pretrained(str(out))
    (out / ck.CONFIG_FILE).write_text(saved.to_yaml())
    (out / ck.STATE_FILE).write_text(state.to_json())
    (out / STATE_FILE).write_text(json.dumps({"step": state.global_step, "sampler_path": sampler_path, "external_path": external}) + "\n")
    return out
