"""Model references: `baseline` | an adapter directory | `runs:/...` | `models:/...` -> ModelSpec.

The one parser of a model reference (evaluate, serve, analyze and the registry all resolve through
`resolve_model_ref`); MLflow URIs are downloaded into a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from newsray.config import Config, ModelConfig
from newsray.errors import ModelError

log = logging.getLogger(__name__)

BASELINE = "baseline"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NEWSRAY_CONFIG = "newsray_config.yaml"
MLFLOW_SCHEMES = ("runs:/", "models:/")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model_ref: where the adapter lives locally (None = baseline) and the base model."""

    ref: str
    adapter_dir: Path | None
    model: ModelConfig
    base_from_adapter: bool


def model_slug(model_ref: str) -> str:
    """A short file-name-safe name of a model_ref (baseline, run-<id8>, <name>-<alias>, <dir>)."""
    ref = model_ref.strip()
    if ref == BASELINE:
        slug = BASELINE
    elif ref.startswith("runs:/"):
        slug = "run-" + ref[len("runs:/"):].split("/")[0][:8]
    elif ref.startswith("models:/"):
        slug = ref[len("models:/"):].replace("@", "-").replace("/", "-v", 1)
    else:
        parts = Path(ref).expanduser().parts[-2:]
        generic = {"adapter", "model", "final", "checkpoint", "lora"}
        slug = "-".join(parts) if len(parts) == 2 and parts[-1].lower() in generic else Path(ref).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-") or "model"


def _find_adapter(root: Path) -> Path | None:
    """The directory holding adapter_config.json: root itself or the shallowest one below it."""
    if (root / ADAPTER_CONFIG).is_file():
        return root
    found = sorted(root.rglob(ADAPTER_CONFIG), key=lambda p: len(p.parts))
    return found[0].parent if found else None


def _download(model_ref: str, cfg: Config) -> Path:
    """Download an MLflow artefact URI into a fresh temporary directory, removed when this process exits (ModelError if it fails)."""
    import mlflow

    from newsray import tracking

    uri = tracking.tracking_uri(cfg)
    try:
        tracking.use_store(uri)
        dst = tempfile.mkdtemp(prefix="newsray-adapter-")
        atexit.register(shutil.rmtree, dst, ignore_errors=True)  # the weights are in memory by then; no copy left behind
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_ref, dst_path=dst, tracking_uri=uri))
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for a missing run/model/alias
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"MLflow URI {model_ref} cannot be downloaded from the tracking store {uri} ({first}); "
                         "check the run id / model name, version or alias, and tracking.uri.") from None


def _adapter_model_config(adapter_dir: Path, fallback: ModelConfig) -> tuple[ModelConfig, bool]:
    """The base model named by the adapter's newsray_config.yaml (if any), else `fallback`.

    The adapter names the base model (name, window, chat template); how to load it here (dtype,
    4-bit) stays `fallback`'s, so a QLoRA adapter trained on a GPU loads on a CPU and
    `model.dtype=...` applies to adapters as to the baseline.
    """
    import yaml

    path = adapter_dir / ADAPTER_NEWSRAY_CONFIG
    if not path.is_file():
        return fallback, False
    try:
        section = (yaml.safe_load(path.read_text()) or {}).get("model")
        model = ModelConfig.model_validate(section) if section else None
    except Exception as e:  # noqa: BLE001 - YAML or validation errors: the file is unusable
        raise ModelError(f"{path}: its model section cannot be read ({str(e).splitlines()[0]}); fix or remove the file.") from None
    if model is None:
        return fallback, False
    model = model.model_copy(update={"dtype": fallback.dtype, "load_in_4bit": fallback.load_in_4bit})
    if model.chat_template and not Path(model.chat_template).is_file():
        model = model.model_copy(update={"chat_template": None})  # the adapter's tokenizer carries the template
    return model, True


def resolve_model_ref(model_ref: str, cfg: Config) -> ModelSpec:
    """`baseline`, an adapter directory or an MLflow URI -> ModelSpec (downloads MLflow artefacts)."""
    ref = model_ref.strip()
    if ref == BASELINE:
        return ModelSpec(ref, None, cfg.model, False)
    if ref.startswith(MLFLOW_SCHEMES):
        root = _download(ref, cfg)
        adapter = _find_adapter(root)
        if adapter is None:
            raise ModelError(f"MLflow URI {ref} holds no {ADAPTER_CONFIG} (downloaded to {root}); point it at a PEFT adapter directory.")
    elif "://" in ref or ref.startswith(("runs:", "models:")):
        raise ModelError(f"model {ref!r}: unsupported URI; use baseline, an adapter directory, runs:/<run_id>/<path>, "
                         "models:/<name>@<alias> or models:/<name>/<version>.")
    else:
        adapter = Path(ref).expanduser().resolve()
        if not adapter.is_dir():
            raise ModelError(f"adapter directory {adapter} does not exist; pass --model baseline, a PEFT adapter directory "
                             "(with adapter_config.json) or an MLflow URI (runs:/..., models:/...).")
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{adapter} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter directory; pass the directory "
                             "that training wrote (adapter_config.json, adapter_model.safetensors, tokenizer files).")
    model, from_adapter = _adapter_model_config(adapter, cfg.model)
    if from_adapter and model.name != cfg.model.name:
        log.warning("using base model %s from %s (the config names %s)", model.name, adapter / ADAPTER_NEWSRAY_CONFIG, cfg.model.name)
    return ModelSpec(ref, adapter, model, from_adapter)


def on_device(spec: ModelSpec, dtype_choice: str, device: str = "cpu") -> ModelSpec:
    """`spec` as an evaluation actor or Serve replica on `device` loads it: its base in `dtype_choice`
    (eval.dtype / serve.dtype; newsray.models.inference_dtype decides `auto` by the device's capability)."""
    from dataclasses import replace

    from newsray.models import inference_dtype

    dtype = inference_dtype(dtype_choice, spec.model.dtype, device)
    return replace(spec, model=spec.model.model_copy(update={"dtype": dtype}))
