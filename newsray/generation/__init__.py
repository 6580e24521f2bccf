"""Generation: the one path from a model reference and chat prompts to answers (evaluate, analyze, serve).

Modules, each owning one thing (imports flow downwards, no cycles):
- refs.py       model references (`baseline` | adapter dir | `runs:/` | `models:/`) -> ModelSpec
- stop.py       the JSON-structure-aware stop rule (JsonScanner)
- grammar.py    the task grammars for constrained decoding (llguidance), one state per row
- engine.py     continuous batching over a preallocated slot KV cache (Engine, SlotCache)
- generator.py  a loaded model for a task: prompts -> engine -> GenerationResult; load_generator
- pool.py       one unmerged base shared by several LoRA adapters (SharedBase, Serve multiplexing)
- vllm.py       the GPU path through Ray's LLM APIs (ray.data.llm, ray.serve.llm): eval.engine / serve.engine
"""

from newsray.generation.engine import Engine, Request, SlotCache
from newsray.generation.generator import (
    GenerationResult,
    Generator,
    load_generator,
    load_tokenizer_for,
)
from newsray.generation.pool import SharedBase
from newsray.generation.refs import (
    ADAPTER_CONFIG,
    ADAPTER_NEWSRAY_CONFIG,
    BASELINE,
    MLFLOW_SCHEMES,
    ModelSpec,
    model_slug,
    on_device,
    resolve_model_ref,
)
from newsray.generation.stop import JsonScanner

__all__ = ["ADAPTER_CONFIG", "ADAPTER_NEWSRAY_CONFIG", "BASELINE", "MLFLOW_SCHEMES", "Engine", "GenerationResult", "Generator",
           "JsonScanner", "ModelSpec", "Request", "SharedBase", "SlotCache", "load_generator", "load_tokenizer_for",
           "model_slug", "on_device", "resolve_model_ref"]
