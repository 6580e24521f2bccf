"""`newsray export`: a trained model (baseline, adapter dir, runs:/ or models:/ URI) for use outside newsray.

Formats (docs/EXPORT.md):
- merged: base + LoRA merged (the same merge_and_unload the generation path does) into a Hugging
  Face safetensors directory with the tokenizer, its chat template and a generation config whose
  stop ids are newsray's (end-of-turn + EOS); plain transformers loads it.
- gguf:   that merged model as one GGUF file (f32 / f16 / bf16 / q8_0, newsray.export.gguf_file)
  for llama.cpp and everything built on it.
- ollama: the GGUF plus a Modelfile (TEMPLATE, SYSTEM and stops from the chat template,
  newsray.export.ollama) and, for an adapter, the `ADAPTER` variant: base GGUF + the PEFT
  safetensors LoRA.
The export is written into a hidden staging directory beside --out and moved into place when
complete, so a failed export leaves nothing half-written. When the model is an MLflow URI the
files are logged as artefacts of the run it came from (for models:/, the run of the resolved
version, which is also tagged with where they are).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.errors import ConfigError, ModelError

FORMATS = ("merged", "gguf", "ollama")
DTYPES = ("float32", "bfloat16", "float16")
MANIFEST = "newsray_export.json"
TAG_PREFIX = "newsray.export."


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and where it was logged."""

    format: str
    out_dir: Path
    files: list[str]  # relative to out_dir
    model_ref: str
    base_model: str
    artifact_uri: str | None = None  # runs:/<id>/exports/<name> when logged to MLflow
    model_version: str | None = None  # <name>/<version> of a models:/ ref
    tensor_types: dict[str, int] = field(default_factory=dict)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_args(fmt: str, quant: str, dtype: str, out: Path) -> None:
    from newsray.export.gguf_file import QUANTS

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not an export format; use one of {', '.join(FORMATS)}.")
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant!r} is not a GGUF type newsray writes; use one of {', '.join(QUANTS)}.")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not a weight dtype; use one of {', '.join(DTYPES)}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} is not an empty directory; give a new or empty directory (nothing there is overwritten).")


def _save_merged(gen: Any, directory: Path, dtype: str) -> None:
    """The merged model + tokenizer (chat template) + newsray's stop ids as its generation config."""
    import torch
    from transformers import GenerationConfig

    model = gen.model
    model.generation_config = GenerationConfig(
        eos_token_id=list(gen.stop_ids), pad_token_id=gen.pad_id, bos_token_id=gen.tokenizer.bos_token_id, do_sample=False)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(str(directory))
    gen.tokenizer.save_pretrained(str(directory))


def _task_prompt(cfg: Config) -> str:
    """The task's user turn with placeholders: the format hint the model was trained on."""
    from newsray.tasks import get_task

    return get_task(cfg).make_user_prompt(title="{title}", content="{content}", text="{text}")


def _ollama(cfg: Config, gen: Any, spec: Any, stage: Path, gguf_name: str, quant: str, name: str,
            progress: Callable[[str], None]) -> dict[str, int]:
    from newsray.export import ollama
    from newsray.export.gguf_file import write_gguf

    tok_dir = stage / ".tokenizer"
    gen.tokenizer.save_pretrained(str(tok_dir))
    gen.model.config.save_pretrained(str(tok_dir))
    counts = write_gguf(gen.model, gen.tokenizer, tok_dir, stage / gguf_name, quant, name)
    pieces = ollama.chat_pieces(gen.tokenizer)
    prompt = _task_prompt(cfg)
    (stage / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    header = [f"newsray export of {spec.ref} (task {cfg.data.task}, base {spec.model.name}, {quant}).",
              "Send the user turn as newsray builds it (prompt.txt: the task's prompt and answer format), e.g.:",
              *("  " + line for line in prompt.splitlines()),
              "Build it: ollama create <name> -f Modelfile"]
    ctx = spec.model.max_seq_length
    (stage / "Modelfile").write_text(ollama.modelfile(pieces, f"./{gguf_name}", ctx, header), encoding="utf-8")
    if spec.adapter_dir is not None:
        from newsray.models import load_model

        progress("writing the ADAPTER variant: the base model as GGUF + the PEFT LoRA...")
        (stage / "adapter").mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(spec.adapter_dir / f, stage / "adapter" / f)
        base_name = gguf_name.replace(name, "base", 1) if gguf_name.startswith(name) else f"base-{quant}.gguf"
        base = load_model(spec.model, "cpu")
        write_gguf(base, gen.tokenizer, tok_dir, stage / base_name, quant, f"{name}-base")
        del base
        note = "Base model + LoRA adapter (Ollama applies it): ollama create <name> -f Modelfile.adapter"
        text = ollama.modelfile(pieces, f"./{base_name}", ctx, [*header[:-1], note], adapter="./adapter")
        (stage / "Modelfile.adapter").write_text(text, encoding="utf-8")
    shutil.rmtree(tok_dir)
    return counts


def _log_to_mlflow(cfg: Config, model_ref: str, out: Path, name: str) -> tuple[str | None, str | None]:
    """Log `out` as artefacts of the run `model_ref` came from; tag the model version. -> (artifact uri, version)."""
    import mlflow

    from newsray import tracking

    uri = tracking.tracking_uri(cfg)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = None
    if model_ref.startswith("runs:/"):
        run_id = model_ref[len("runs:/"):].split("/")[0]
    else:
        ref = model_ref[len("models:/"):]
        if "@" in ref:
            reg, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(reg, alias)
        else:
            reg, num = ref.rsplit("/", 1)
            mv = client.get_model_version(reg, num)
        version = f"{mv.name}/{mv.version}"
        run_id = mv.run_id
        if not run_id:
            raise ModelError(f"model version {version} names no MLflow run, so the export has no run to be logged to; "
                             "pass --no-log, or register versions from runs (newsray train/tune do).")
    path = f"exports/{name}"
    client.log_artifacts(run_id, str(out), path)
    artifact = f"runs:/{run_id}/{path}"
    if version:
        reg, num = version.rsplit("/", 1)
        client.set_model_version_tag(reg, num, TAG_PREFIX + name, artifact)
    return artifact, version


def export(cfg: Config, model_ref: str, fmt: str, out: Path | str, quant: str = "q8_0", dtype: str = "float32",
           log: bool = True, progress: Callable[[str], None] = _stderr) -> ExportResult:
    """Export `model_ref` as `fmt` into the new or empty directory `out` (see the module docstring)."""
    from newsray.export.gguf_file import write_gguf
    from newsray.generation import load_generator, model_slug, resolve_model_ref

    out = Path(out).expanduser().resolve()
    _check_args(fmt, quant, dtype, out)
    # Merge in fp32 on the CPU whatever the config trains/serves in: the file type is chosen below.
    cfg32 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32", "load_in_4bit": False})})
    spec = resolve_model_ref(model_ref, cfg32)
    progress(f"loading {model_ref} (base {spec.model.name}){' and merging its adapter' if spec.adapter_dir else ''}...")
    gen = load_generator(model_ref, cfg32, spec=spec)
    slug = model_slug(model_ref)
    label = f"{fmt}-{dtype}" if fmt == "merged" else f"{fmt}-{quant}"
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; --out is an ordinary directory
    counts: dict[str, int] = {}
    try:
        gguf_name = f"{slug}-{quant}.gguf"
        if fmt == "merged":
            progress(f"writing the merged model ({dtype}) to {out}...")
            _save_merged(gen, stage, dtype)
        elif fmt == "gguf":
            progress(f"writing {gguf_name} ({quant}) to {out}...")
            tok_dir = stage / ".tokenizer"
            gen.tokenizer.save_pretrained(str(tok_dir))
            gen.model.config.save_pretrained(str(tok_dir))
            counts = write_gguf(gen.model, gen.tokenizer, tok_dir, stage / gguf_name, quant, slug)
            shutil.rmtree(tok_dir)
        else:
            progress(f"writing {gguf_name} ({quant}) and the Modelfile to {out}...")
            counts = _ollama(cfg, gen, spec, stage, gguf_name, quant, slug, progress)
        files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        manifest = {
            "format": fmt, "type": dtype if fmt == "merged" else quant, "model_ref": model_ref, "base_model": spec.model.name,
            "adapter": str(spec.adapter_dir) if spec.adapter_dir else None, "task": cfg.data.task, "files": files,
            "stop_tokens": [gen.tokenizer.convert_ids_to_tokens(i) for i in gen.stop_ids], "tensor_types": counts,
            "versions": {d: _version(d) for d in ("newsray", "torch", "transformers", "peft", "gguf")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        files.append(MANIFEST)
        if out.exists():  # empty (checked): move the contents in
            for p in stage.iterdir():
                os.replace(p, out / p.name)
            stage.rmdir()
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    artifact = version = None
    if log and model_ref.strip().startswith(("runs:/", "models:/")):
        progress("logging the export to MLflow...")
        artifact, version = _log_to_mlflow(cfg, model_ref.strip(), out, label)
    return ExportResult(fmt, out, sorted(files), model_ref, spec.model.name, artifact, version, counts)
