"""The one generation path (evaluation and serving): base model + optional adapter, batched greedy.

`load_generator(model_ref, cfg)` resolves `baseline`, a local PEFT adapter directory or an MLflow
URI, loads base + adapter once and returns a `Generator`. `Generator.generate` formats prompts
with `newsray.formatting.Formatter` (byte-identical to training), left-pads the batch, decodes
greedily, stops a row on the end-of-turn/EOS ids or (news task) as soon as its first top-level
JSON object closes, and decodes only the new tokens. `constrained=True` adds the task's grammar
(newsray.constrained: the NewsAnswer JSON schema, or the four AG News labels).

The decode loop is ours, not `model.generate`: a row that has finished leaves the batch (its
KV-cache rows are dropped), so a batch costs the steps of its rows, not max_new_tokens x batch
size. Greedy text is the same as one row at a time (tests/test_inference.py, bench/eval_throughput.py).
"""

from __future__ import annotations

import atexit
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from newsray.config import Config, ModelConfig
from newsray.errors import ModelError

log = logging.getLogger(__name__)

BASELINE = "baseline"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NEWSRAY_CONFIG = "newsray_config.yaml"
MLFLOW_SCHEMES = ("runs:/", "models:/")
FinishReason = Literal["stop", "json_end", "length"]


@dataclass(frozen=True)
class GenerationResult:
    """One row's continuation: decoded new text, tokens generated, and why it ended."""

    text: str
    n_new_tokens: int
    finish_reason: FinishReason  # stop: end-of-turn/EOS; json_end: first JSON object closed; length: budget


# --------------------------------------------------------------------------------------
# JSON-structure-aware stop


class JsonScanner:
    """Tracks brace depth outside JSON strings (with escapes) from the first '{' on."""

    __slots__ = ("closed", "depth", "escape", "in_string")

    def __init__(self) -> None:
        self.depth, self.in_string, self.escape, self.closed = 0, False, False, False

    def feed(self, text: str) -> bool:
        """Consume text; True once the first top-level object has closed."""
        if self.closed:
            return True
        for ch in text:
            if self.depth == 0:  # before the object: only its opening brace matters
                if ch == "{":
                    self.depth = 1
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch == "{":
                self.depth += 1
            elif ch == "}":
                self.depth -= 1
                if self.depth == 0:
                    self.closed = True
                    return True
        return False


# --------------------------------------------------------------------------------------
# Model references


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


# --------------------------------------------------------------------------------------
# The generator


class Generator:
    """A loaded model + tokenizer that generates answers for one task, batch by batch."""

    def __init__(self, model: Any, tokenizer: Any, task: str, spec: ModelSpec, device: str = "cpu",
                 shared: tuple[str, SharedBase] | None = None):
        from newsray.formatting import Formatter

        self.model, self.tokenizer, self.task, self.spec, self.device = model, tokenizer, task, spec, device
        self.shared = shared  # (adapter name, pool): the model is a SharedBase's, switched to this adapter per call
        self.formatter = Formatter.for_tokenizer(tokenizer, spec.model.max_seq_length)
        self.stop_ids = self.formatter.stop_token_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.formatter.eot_id
        self._texts: list[str] | None = None
        self._constraint: Any = None

    @property
    def base_model(self) -> str:
        return self.spec.model.name

    @property
    def token_texts(self) -> list[str]:
        """The decoded text of every token id (built once; used by the JSON stop and constraints)."""
        if self._texts is None:
            n = max(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])
            self._texts = self.tokenizer.batch_decode([[i] for i in range(min(n, len(self.tokenizer)))],
                                                      skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._texts += [""] * (n - len(self._texts))
        return self._texts

    def constraint(self) -> Any:
        """The task's grammar constraint (newsray.constrained), built once."""
        if self._constraint is None:
            from newsray.constrained import TaskConstraint

            self._constraint = TaskConstraint(self.tokenizer, self.task, self.stop_ids, self.token_texts)
        return self._constraint

    def generate(self, messages_batch: list[list[dict[str, str]]], max_new_tokens: int,
                 constrained: bool = False) -> list[GenerationResult]:
        """Greedy continuations of a batch of chat prompts (left-padded), new tokens only."""
        if not messages_batch:
            return []
        prompts = [self.formatter.prompt_ids(m) for m in messages_batch]
        width = max(map(len, prompts))
        if width + max_new_tokens > self.formatter.max_seq_length:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceed model.max_seq_length (%d)",
                        width, max_new_tokens, self.formatter.max_seq_length)
        grammar = self.constraint().mask(len(prompts), max_new_tokens) if constrained else None
        with self.shared[1].activate(self.shared[0]) if self.shared else nullcontext():
            rows = self._decode(prompts, max_new_tokens, grammar)
        return [GenerationResult(self.tokenizer.decode(toks if reason != "stop" else toks[:-1], skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=False), len(toks), reason)
                for toks, reason in rows]

    def _decode(self, prompts: list[list[int]], max_new_tokens: int, grammar: Any = None) -> list[tuple[list[int], FinishReason]]:
        """Batched greedy decoding with a KV cache; finished rows leave the batch. -> (new tokens, reason) per row.

        A row ends on a stop id (kept as its last token, reason "stop"), when its first top-level
        JSON object closes (news task, "json_end") or at max_new_tokens ("length"). Positions come
        from the attention mask, so left padding does not shift a row's positions.
        """
        import torch
        from transformers import DynamicCache

        dev, width = self.device, max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        scanners = [JsonScanner() for _ in prompts] if self.task == "news" else None
        texts, stop_ids = self.token_texts, set(self.stop_ids)
        new: list[list[int]] = [[] for _ in prompts]
        reasons: list[FinishReason] = ["length"] * len(prompts)
        active = list(range(len(prompts)))  # original row index of each batch row
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1, :]
            next_pos = positions[:, -1] + 1
            for step in range(max_new_tokens):
                if grammar is not None:
                    logits = grammar.apply(active, step, logits)
                chosen = logits.argmax(-1)
                keep = []
                for i, (r, tok) in enumerate(zip(active, chosen.tolist())):
                    new[r].append(tok)
                    if tok in stop_ids:
                        reasons[r] = "stop"
                    elif scanners is not None and scanners[r].feed(texts[tok] if tok < len(texts) else ""):
                        reasons[r] = "json_end"
                    elif step + 1 < max_new_tokens:
                        keep.append(i)
                        if grammar is not None:
                            grammar.consume(r, tok)
                if not keep:
                    break
                if len(keep) < len(active):  # drop finished rows from the batch and the cache
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    mask, next_pos, chosen = mask[idx], next_pos[idx], chosen[idx]
                    active = [active[i] for i in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                logits = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                    past_key_values=cache, use_cache=True).logits[:, -1, :]
                next_pos = next_pos + 1
        return list(zip(new, reasons))


class SharedBase:
    """One unmerged copy of a base model under several LoRA adapters (PEFT multi-adapter).

    Each adapter added costs its LoRA weights, not another copy of the base (a merged adapter is a
    full copy: 0.5 GB for SmolLM2-135M, 5 GB for Llama-3.2-1B in fp32). Generators made here take
    turns on the one model: `activate` switches the active adapter under a lock held for the call.
    Unmerged LoRA costs a few extra small matmuls per layer and token.
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.model, self.adapters = device, None, set()
        self.base_name: str | None = None
        self._lock = threading.Lock()

    def add(self, name: str, spec: ModelSpec, task: str) -> Generator:
        """Load the adapter of `spec` as `name` (the base model once, on the first call) and return its Generator."""
        from peft import PeftModel

        from newsray.models import load_model

        if spec.adapter_dir is None:
            raise ModelError(f"model {name!r} is the base model, not an adapter: it needs no shared base.")
        with self._lock:
            if self.base_name is not None and spec.model.name != self.base_name:
                raise ModelError(f"adapter {name!r} is trained on {spec.model.name}, not on this pool's base {self.base_name}.")
            key = _peft_name(name)
            if key not in self.adapters:
                t0 = time.perf_counter()
                try:
                    if self.model is None:
                        base = load_model(spec.model, self.device)
                        self.model = PeftModel.from_pretrained(base, str(spec.adapter_dir), adapter_name=key, is_trainable=False)
                        self.base_name = spec.model.name
                    else:
                        self.model.load_adapter(str(spec.adapter_dir), adapter_name=key, is_trainable=False)
                except (OSError, ValueError, KeyError, RuntimeError) as e:
                    raise ModelError(f"the adapter in {spec.adapter_dir} does not load onto {spec.model.name} "
                                     f"({str(e).splitlines()[0][:200]}); check that it was trained on this base model.") from None
                self.model.eval()
                self.adapters.add(key)
                log.info("adapter %s (%s) added to the shared %s in %.1fs", name, spec.ref, spec.model.name, time.perf_counter() - t0)
        return Generator(self.model, _load_tokenizer(spec), task, spec, self.device, shared=(key, self))

    def remove(self, name: str) -> None:
        """Drop an adapter's weights (the last one stays loaded, as a PeftModel needs one; adding its name again reuses it)."""
        key = _peft_name(name)
        with self._lock:
            if key in self.adapters and len(self.adapters) > 1:
                self.model.delete_adapter(key)
                self.adapters.discard(key)

    @contextmanager
    def activate(self, name: str) -> Iterator[None]:
        """Inside: `name` is the active adapter and no other generator uses the model."""
        with self._lock:
            self.model.set_adapter(name, inference_mode=True)
            yield


def _peft_name(model_id: str) -> str:
    """A PEFT adapter name for a served model id (torch module names cannot hold dots)."""
    return model_id.replace(".", "_")


def _load_tokenizer(spec: ModelSpec) -> Any:
    """The adapter's own tokenizer (saved by training, with its chat template), else the base one."""
    from transformers import AutoTokenizer

    from newsray.models import load_tokenizer

    adapter = spec.adapter_dir
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)
        if spec.model.chat_template:
            tok.chat_template = Path(spec.model.chat_template).read_text(encoding="utf-8")
        if getattr(tok, "chat_template", None):
            tok.model_max_length = spec.model.max_seq_length
            return tok
    return load_tokenizer(spec.model)


def load_generator(model_ref: str, cfg: Config, device: str = "cpu", num_threads: float | None = None,
                   spec: ModelSpec | None = None) -> Generator:
    """Resolve `model_ref`, load base (+ adapter, merged) once in eval mode; torch threads = CPUs given."""
    import torch

    from newsray.models import load_model

    if num_threads:
        torch.set_num_threads(max(1, math.ceil(num_threads)))
    if spec is None or (spec.adapter_dir is not None and not spec.adapter_dir.is_dir()):
        spec = resolve_model_ref(model_ref, cfg)
    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(spec)
    model = load_model(spec.model, device)
    if spec.adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(spec.adapter_dir), is_trainable=False).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"the adapter in {spec.adapter_dir} does not load onto {spec.model.name} "
                             f"({str(e).splitlines()[0][:200]}); check that it was trained on this base model.") from None
    model.eval()
    log.info("loaded %s (base %s) in %.1fs", model_ref, spec.model.name, time.perf_counter() - t0)
    return Generator(model, tokenizer, cfg.data.task, spec, device)
