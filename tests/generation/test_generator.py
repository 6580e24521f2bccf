"""The generation path: parse rule, JSON stop, batching, structured decoding, adapters, bad refs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from newsray.config import Config, DataConfig, ModelConfig, TrackingConfig
from newsray.errors import GenerationError, ModelError
from newsray.generation import (
    Generator,
    JsonScanner,
    load_generator,
    model_slug,
    resolve_model_ref,
)
from newsray.generation.refs import _adapter_model_config
from newsray.tasks import get_task
from newsray.tasks.agnews import LABELS
from newsray.tasks.news import parse_prediction

GOOD = {"relevance_score": 7, "summary": "S", "key_insights": ["a", "b"], "company_names": ["Acme"]}
INVALID = {"relevance_score": 0, "key_insights": [], "company_names": [], "summary": "", "is_valid_json": False}


def _cfg(task: str = "news", run_dir: Path | None = None, data_dir: Path | None = None) -> Config:
    return Config(data=DataConfig(task=task, root=str(data_dir) if data_dir else None),
                  model=ModelConfig(max_seq_length=1024),
                  tracking=TrackingConfig(run_dir=str(run_dir)) if run_dir else TrackingConfig())


# ------------------------------------------------------------------ parse rule


@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    "Here you go:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nAnything after {",
    json.dumps(GOOD | {"action_items": ["x"]}),  # extra keys are ignored
    "[" + json.dumps(GOOD) + "]",  # decoding starts at the first '{', whatever precedes it
])
def test_parse_valid(text):
    assert parse_prediction(text) == {**GOOD, "is_valid_json": True}


@pytest.mark.parametrize("text", [
    "",
    "The article is about Netflix.",
    json.dumps(GOOD)[:-1],  # truncated
    json.dumps({k: v for k, v in GOOD.items() if k != "company_names"}),
    json.dumps(GOOD | {"relevance_score": "7"}),
    json.dumps(GOOD | {"relevance_score": 7.0}),
    json.dumps(GOOD | {"relevance_score": True}),
    json.dumps(GOOD | {"relevance_score": 11}),
    json.dumps(GOOD | {"key_insights": "a"}),
    json.dumps(GOOD | {"company_names": [1]}),
    json.dumps(GOOD | {"summary": None}),
    "{not json} " + json.dumps(GOOD),  # only the first '{' counts
])
def test_parse_invalid(text):
    assert parse_prediction(text) == INVALID


# ------------------------------------------------------------------ JSON-structure-aware stop


def test_json_scanner_strings_and_escapes():
    s = JsonScanner()
    assert not s.feed('prose with "quotes" and } before {"a": "}\\" {", "b": {"c": [1, "\\\\"]')
    assert s.depth == 2 and not s.in_string
    assert s.feed("}} trailing")
    assert s.feed("more")  # stays closed


def _stop_positions(tokenizer, text: str) -> tuple[list[int], int | None]:
    """Feed the real token stream of `text`, token by token as the decode loop does, through JsonScanner."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    scanner = JsonScanner()
    for k, tok in enumerate(ids):
        if scanner.feed(texts[tok]):
            return ids, k
    return ids, None


@pytest.mark.parametrize("tok_fixture", ["smollm2_tokenizer", "llama3_tokenizer"])
def test_json_stop_on_real_token_streams(request, tok_fixture):
    tok = request.getfixturevalue(tok_fixture)
    answer = json.dumps({"relevance_score": 3, "summary": 'He said "}{" \\ ok', "key_insights": ["{x}"], "company_names": []}, indent=2)
    ids, at = _stop_positions(tok, "Sure! " + answer + "\nThis JSON {is} done.")
    assert at is not None
    head = tok.decode(ids[: at + 1])
    assert head.rstrip().endswith("}") and json.loads(head[head.index("{"):].rstrip()) == json.loads(answer)
    assert tok.decode(ids[:at]).count("{") >= 1 and not tok.decode(ids[:at]).rstrip().endswith("\n}")
    assert _stop_positions(tok, "No JSON here, only prose.")[1] is None
    assert _stop_positions(tok, answer[:-1])[1] is None  # unclosed: keeps going


# ------------------------------------------------------------------ model refs (no model load)


def test_model_slug():
    assert model_slug("baseline") == "baseline"
    assert model_slug("runs:/0123456789abcdef/adapter") == "run-01234567"
    assert model_slug("models:/newsray-news@champion") == "newsray-news-champion"
    assert model_slug("models:/newsray-news/3") == "newsray-news-v3"
    assert model_slug("/x/runs/my-run/adapter") == "my-run-adapter"


def test_bad_model_refs(tmp_path):
    cfg = _cfg(run_dir=tmp_path / "runs")
    with pytest.raises(ModelError, match="adapter directory .*nope does not exist"):
        resolve_model_ref(str(tmp_path / "nope"), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no adapter_config.json"):
        resolve_model_ref(str(tmp_path / "empty"), cfg)
    with pytest.raises(ModelError, match="MLflow URI runs:/0123456789abcdef0123456789abcdef/adapter cannot be downloaded"):
        resolve_model_ref("runs:/0123456789abcdef0123456789abcdef/adapter", cfg)
    with pytest.raises(ModelError, match="MLflow URI models:/nope@champion cannot be downloaded"):
        resolve_model_ref("models:/nope@champion", cfg)
    with pytest.raises(ModelError, match="unsupported URI"):
        resolve_model_ref("s3://bucket/adapter", cfg)
    for err in (ModelError,):
        try:
            resolve_model_ref(str(tmp_path / "nope"), cfg)
        except err as e:
            assert "\n" not in str(e)


# ------------------------------------------------------------------ generation on the embedded model


@pytest.fixture(scope="module")
def news_gen(embedded_model, data_dir) -> Generator:
    return load_generator("baseline", _cfg("news", data_dir=data_dir), num_threads=2)


def _examples(task: str, data_dir: Path, n: int):
    return get_task(_cfg(task, data_dir=data_dir)).load().test[:n]


@pytest.mark.slow
def test_batched_equals_unbatched(news_gen, data_dir):
    """Greedy text with left-padded batching equals one-at-a-time (prompts of different lengths)."""
    exs = _examples("news", data_dir, 3)
    msgs = [e.messages() for e in exs]
    assert len({len(news_gen.formatter.prompt_ids(m)) for m in msgs}) > 1  # padding really happens
    batched = news_gen.generate(msgs, 32)
    single = [news_gen.generate([m], 32)[0] for m in msgs]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.n_new_tokens for r in batched] == [r.n_new_tokens for r in single]
    assert all(r.text.strip() for r in batched)


@pytest.mark.slow
def test_rows_leave_the_batch_without_changing_the_others(news_gen, data_dir):
    """Rows that finish early (constrained: at different steps) leave the batch and the KV cache;
    every row's text is still what it is alone."""
    from newsray.tasks import task_type

    msgs = [e.messages() for e in _examples("news", data_dir, 4)]
    budget = task_type("news").grammar()[1] + 24
    batched = news_gen.generate(msgs, budget, constrained=True)
    single = [news_gen.generate([m], budget, constrained=True)[0] for m in msgs]
    assert len({r.n_new_tokens for r in batched}) > 1  # rows really left at different steps
    assert [(r.text, r.n_new_tokens, r.finish_reason) for r in batched] == [(r.text, r.n_new_tokens, r.finish_reason) for r in single]


def test_constrained_news_is_always_valid(news_gen, data_dir):
    """The untrained model, constrained, gives schema-valid JSON every time, within budget."""
    from newsray.tasks import task_type

    exs = _examples("news", data_dir, 4)
    budget = task_type("news").grammar()[1] + 16  # close to the smallest budget the reserve guarantees
    results = news_gen.generate([e.messages() for e in exs], budget, constrained=True)
    for r in results:
        rec = parse_prediction(r.text)
        assert rec["is_valid_json"], r.text
        assert json.loads(r.text) == {k: v for k, v in rec.items() if k != "is_valid_json"}  # nothing around it
        assert r.finish_reason == "json_end" and r.n_new_tokens <= budget
    plain = news_gen.generate([exs[0].messages()], 24)[0]
    assert not parse_prediction(plain.text)["is_valid_json"]  # unconstrained, it writes prose


def test_agnews_constrained_is_always_a_label(news_gen, data_dir):
    gen = Generator(news_gen.model, news_gen.tokenizer, "agnews", news_gen.spec)
    exs = _examples("agnews", data_dir, 6)
    results = gen.generate([e.messages() for e in exs], 8, constrained=True)
    assert all(r.text in LABELS and r.finish_reason == "stop" for r in results), results


def test_constrained_grammar_accepts_every_gold_answer(news_gen, data_dir):
    """The schema bounds and whitespace rule admit all 460 annotated answers, token by token."""
    from llguidance import LLMatcher

    c = news_gen.constraint()
    splits = get_task(_cfg("news", data_dir=data_dir)).load()
    for ex in splits.train + splits.val + splits.test:
        m = LLMatcher(c.ll_tokenizer, c.grammar, log_level=0)
        assert m.consume_tokens(news_gen.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]), (ex.id, m.get_error())
        assert m.is_accepting()


# ------------------------------------------------------------------ adapters: directory and MLflow URI


def make_adapter(directory: Path, model, tokenizer, mcfg: ModelConfig) -> Path:
    """A real (untrained, randomly initialised) PEFT LoRA adapter in the training contract's layout."""
    import copy

    import yaml
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at init would make the adapter a no-op: give it real weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / "newsray_config.yaml").write_text(yaml.safe_dump({"model": mcfg.model_dump(mode="json")}))
    return directory


def test_adapter_names_the_base_and_the_config_says_how_to_load_it(tmp_path):
    """A QLoRA adapter trained on a GPU (4-bit, bf16) is loaded as this config says (e.g. fp32 on a CPU)."""
    import yaml

    trained = ModelConfig(name="meta-llama/Llama-3.2-1B-Instruct", max_seq_length=1024, dtype="bfloat16", load_in_4bit=True)
    (tmp_path / "newsray_config.yaml").write_text(yaml.safe_dump({"model": trained.model_dump(mode="json")}))
    here = ModelConfig(dtype="float32")
    model, from_adapter = _adapter_model_config(tmp_path, here)
    assert from_adapter and model.name == trained.name and model.max_seq_length == 1024
    assert model.dtype == "float32" and model.load_in_4bit is False


@pytest.mark.slow
def test_adapter_dir_and_runs_uri(news_gen, embedded_model, data_dir, tmp_path):
    import mlflow

    from newsray import tracking

    # The adapter's newsray_config.yaml names the base model (here: the prepared local directory).
    mcfg = ModelConfig(name=embedded_model.source, max_seq_length=1024)
    adapter = make_adapter(tmp_path / "adapter", news_gen.model, news_gen.tokenizer, mcfg)
    cfg = _cfg("news", run_dir=tmp_path / "runs", data_dir=data_dir)
    gen = load_generator(str(adapter), cfg, num_threads=2)
    assert gen.base_model == embedded_model.source != cfg.model.name
    q = "model.layers.0.self_attn.q_proj.weight"
    merged, plain = gen.model.state_dict()[q], news_gen.model.state_dict()[q]
    assert not torch.equal(merged, plain) and not any("lora" in k for k in gen.model.state_dict())
    ex = _examples("news", data_dir, 1)[0]
    ids = torch.tensor([gen.formatter.prompt_ids(ex.messages())])
    with torch.inference_mode():
        delta = (gen.model(ids).logits[0, -1] - news_gen.model(ids).logits[0, -1]).abs().max().item()
    assert delta > 1e-2  # the adapter really changes the model
    assert gen.generate([ex.messages()], 8)[0].n_new_tokens > 0

    # The same directory logged to MLflow resolves from its runs:/ URI (downloaded, base from its config).
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(adapter), "adapter")
    spec = resolve_model_ref(f"runs:/{run.info.run_id}/adapter", cfg)
    assert spec.model.name == embedded_model.source and spec.base_from_adapter
    assert (spec.adapter_dir / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()

    # The downloaded copy is removed when the process that downloaded it exits.
    import subprocess
    import sys

    code = ("import sys; from newsray.config import Config, TrackingConfig; from newsray.generation import resolve_model_ref; "
            f"print(resolve_model_ref('runs:/{run.info.run_id}/adapter', Config(tracking=TrackingConfig(run_dir=sys.argv[1]))).adapter_dir)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True, check=True)
    downloaded = Path(out.stdout.strip().splitlines()[-1])
    assert downloaded.name == "adapter" and not downloaded.exists()


def test_grammar_processor_on_a_llama3_token_stream(llama3_tokenizer):
    """Token by token on a real Llama-3 stream: every answer token allowed, then only end-of-turn
    (never the pad), a token outside the grammar refused, and the budget reserve forces a closing quote."""
    from newsray.formatting import Formatter
    from newsray.generation.grammar import TaskConstraint

    tok = llama3_tokenizer
    stop = Formatter.for_tokenizer(tok, 1024).stop_token_ids()
    pad = tok.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert pad not in stop
    texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    c = TaskConstraint(tok, "news", stop, texts)
    scores = torch.zeros(1, len(tok))

    def allowed(g):
        return (c.apply([g], scores.clone())[0] > float("-inf")).nonzero().flatten().tolist()

    answer = tok(json.dumps(GOOD, indent=2), add_special_tokens=False)["input_ids"]
    g = c.row(400)
    for step, t in enumerate(answer):
        assert t in allowed(g), tok.decode(answer[: step + 1])
        g.consume(t)
    rest = allowed(g)
    assert rest and set(rest) <= set(stop)  # the object is closed: only end-of-turn may follow
    assert pad not in rest
    with pytest.raises(GenerationError, match="left its grammar"):
        g.consume(tok(" more", add_special_tokens=False)["input_ids"][0])

    prefix = tok('{"relevance_score": 5, "summary": "A long', add_special_tokens=False)["input_ids"]
    g = c.row(len(prefix) + c.reserve)
    for t in prefix:
        g.consume(t)
    closing = allowed(g)
    assert closing and all(texts[i] == '"' for i in closing)  # out of budget: close the string now


@pytest.mark.slow
def test_adapters_share_one_base(news_gen, embedded_model, data_dir, tmp_path):
    """Two adapters on one SharedBase: one base copy, each answers as its own merged copy does, evicting frees it."""
    from newsray.generation import SharedBase

    mcfg = ModelConfig(name=embedded_model.source, max_seq_length=1024)
    cfg = _cfg("news", data_dir=data_dir)
    dirs = {}
    for i, name in enumerate(("a", "b.v2")):
        dirs[name] = make_adapter(tmp_path / name, news_gen.model, news_gen.tokenizer, mcfg)
        if i:  # make_adapter always seeds 0: give b other weights (B negated)
            from safetensors.torch import load_file, save_file

            w = load_file(dirs[name] / "adapter_model.safetensors")
            save_file({k: -v if "lora_B" in k else v for k, v in w.items()}, dirs[name] / "adapter_model.safetensors")
    pool = SharedBase()
    shared = {n: pool.add(n, resolve_model_ref(str(d), cfg), "news") for n, d in dirs.items()}
    assert shared["a"].model is shared["b.v2"].model  # one base copy under both
    ex = _examples("news", data_dir, 1)[0]
    ids = torch.tensor([news_gen.formatter.prompt_ids(ex.messages())])

    def last_logits(gen):
        if gen.shared:
            with gen.shared[1].activate(gen.shared[0]), torch.inference_mode():
                return gen.model(input_ids=ids).logits[0, -1]
        with torch.inference_mode():
            return gen.model(input_ids=ids).logits[0, -1]

    merged = {n: load_generator(str(d), cfg, num_threads=2) for n, d in dirs.items()}
    for n in ("a", "b.v2", "a"):  # switching back and forth
        assert torch.allclose(last_logits(shared[n]), last_logits(merged[n]), atol=1e-3)
    assert (last_logits(shared["a"]) - last_logits(shared["b.v2"])).abs().max() > 1e-2
    for n in ("b.v2", "a"):
        assert shared[n].generate([ex.messages()], 12)[0].text == merged[n].generate([ex.messages()], 12)[0].text
    pool.remove("a")
    assert set(pool.model.peft_config) == {"b_v2"}  # a dot is not allowed in a module name
    assert torch.allclose(last_logits(shared["b.v2"]), last_logits(merged["b.v2"]), atol=1e-3)
    pool.remove("b.v2")  # the last adapter stays: re-adding its name reuses it
    assert pool.add("b.v2", resolve_model_ref(str(dirs["b.v2"]), cfg), "news").model is pool.model
