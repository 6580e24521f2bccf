"""Pure metric functions for the news-metadata and AG News tasks (docs/METRICS.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from newsray.tasks.agnews import LABELS
from newsray.tasks.news import SPONSORED_MARKER, invalid_prediction

FIELDS: tuple[str, ...] = ("key_insights", "company_names")
STAT_METRICS: tuple[str, ...] = (
    "f1_key_insights",
    "f1_company_names",
    "f1_overall",
    "jaccard_key_insights",
    "jaccard_company_names",
    "mae_relevance",
)
ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
AGNEWS_LABELS: tuple[str, ...] = LABELS  # the task module owns the label names


@dataclass(frozen=True)
class Record:
    """One normalised prediction or reference; ids are carried but never compared."""

    relevance_score: float
    key_insights: tuple[str, ...]
    company_names: tuple[str, ...]
    summary: str
    is_valid_json: bool = True
    id: Any = field(default=None, compare=False)
    example_id: Any = field(default=None, compare=False)

    @classmethod
    def invalid(cls, id: Any = None, example_id: Any = None) -> Record:
        """The record an unparseable output becomes (the task's invalid_prediction): relevance 0, empty fields, not valid."""
        return cls._normalise(invalid_prediction(), id, example_id)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Record:
        """Normalise a mapping (None or is_valid_json False -> the invalid record)."""
        if d is None:
            return cls.invalid()
        if d.get("is_valid_json", True) is False:
            return cls.invalid(d.get("id"), d.get("example_id"))
        return cls._normalise(d, d.get("id"), d.get("example_id"))

    @classmethod
    def _normalise(cls, d: Mapping[str, Any], id: Any, example_id: Any) -> Record:
        return cls(
            float(d["relevance_score"]),
            tuple(str(s) for s in d["key_insights"]),
            tuple(str(s) for s in d["company_names"]),
            str(d["summary"]),
            bool(d.get("is_valid_json", True)),
            id,
            example_id,
        )


@dataclass(frozen=True)
class SetScores:
    """Set-comparison scores of one field of one example."""

    precision: float
    recall: float
    f1: float
    jaccard: float
    both_empty: bool


def set_scores(pred: Sequence[str], ref: Sequence[str]) -> SetScores:
    """Precision/recall/F1/Jaccard of two string lists as sets (both empty = 1, one empty = 0)."""
    p, r = set(pred), set(ref)
    if not p and not r:
        return SetScores(1.0, 1.0, 1.0, 1.0, True)
    inter = len(p & r)
    precision = inter / len(p) if p else 0.0
    recall = inter / len(r) if r else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return SetScores(precision, recall, f1, inter / len(p | r), False)


def record_text(rec: Record) -> str:
    """The ROUGE text of a record: key insights then company names, joined with ', '."""
    return ", ".join(rec.key_insights + rec.company_names)


def record_length(rec: Record) -> int:
    """Characters of the summary plus those of every key insight and company name."""
    return len(rec.summary) + sum(map(len, rec.key_insights)) + sum(map(len, rec.company_names))


def is_sponsored(rec: Record) -> bool:
    """Whether the summary contains 'Sponsored Ad' (case-insensitive)."""
    return SPONSORED_MARKER in rec.summary.lower()


def is_exact_match(pred: Record, ref: Record) -> bool:
    """Equal relevance, equal lists (in order) and equal summaries."""
    return (
        pred.relevance_score == ref.relevance_score
        and pred.key_insights == ref.key_insights
        and pred.company_names == ref.company_names
        and pred.summary == ref.summary
    )


def example_metrics(pred: Record, ref: Record) -> dict[str, float]:
    """Per-example P/R/F1/Jaccard per field, f1_overall, mae_relevance, exact_match, length."""
    out: dict[str, float] = {}
    for name in FIELDS:
        s = set_scores(getattr(pred, name), getattr(ref, name))
        out[f"precision_{name}"] = s.precision
        out[f"recall_{name}"] = s.recall
        out[f"f1_{name}"] = s.f1
        out[f"jaccard_{name}"] = s.jaccard
    out["f1_overall"] = (out["f1_key_insights"] + out["f1_company_names"]) / 2
    out["mae_relevance"] = abs(ref.relevance_score - pred.relevance_score)
    out["exact_match"] = float(is_exact_match(pred, ref))
    out["length"] = float(record_length(pred))
    return out


def _check_paired(preds: Sequence[Record], refs: Sequence[Record]) -> None:
    """Raise ValueError unless the two sequences are non-empty and of equal length."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references.")
    if not preds:
        raise ValueError("No examples to score.")


def per_example_metrics(preds: Sequence[Record], refs: Sequence[Record]) -> dict[str, list[float]]:
    """Every per-example metric as a list over examples, paired by position."""
    _check_paired(preds, refs)
    rows = [example_metrics(p, r) for p, r in zip(preds, refs)]
    return {k: [row[k] for row in rows] for k in rows[0]}


def pooled_precision_recall(preds: Sequence[Record], refs: Sequence[Record]) -> tuple[float, float]:
    """Mean P and R over all (example, field) pairs that are not both empty (1.0 if none)."""
    scores = [
        s
        for p, r in zip(preds, refs)
        for name in FIELDS
        if not (s := set_scores(getattr(p, name), getattr(r, name))).both_empty
    ]
    if not scores:
        return 1.0, 1.0
    return (
        float(np.mean([s.precision for s in scores])),
        float(np.mean([s.recall for s in scores])),
    )


def relevance_metrics(preds: Sequence[Record], refs: Sequence[Record]) -> dict[str, float]:
    """MAE, R² and adjusted R² (one predictor) of the relevance scores."""
    y = np.array([r.relevance_score for r in refs], dtype=float)
    yhat = np.array([p.relevance_score for p in preds], dtype=float)
    n = len(y)
    ss_res = float(np.sum((y - yhat) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    if ss_tot == 0:  # constant references: perfect or nothing, as scikit-learn does
        r2 = 1.0 if ss_res == 0 else 0.0
    else:
        r2 = 1 - ss_res / ss_tot
    adjusted = 1 - (1 - r2) * (n - 1) / (n - 2) if n > 2 else r2
    return {
        "relevance_mae": float(np.mean(np.abs(y - yhat))),
        "relevance_r2": r2,
        "relevance_adjusted_r2": adjusted,
    }


def length_stats(preds: Sequence[Record]) -> dict[str, float]:
    """Mean, population SD, min and max of the prediction lengths."""
    lengths = np.array([record_length(p) for p in preds], dtype=float)
    return {
        "avg_length": float(np.mean(lengths)),
        "std_length": float(np.std(lengths)),
        "min_length": float(np.min(lengths)),
        "max_length": float(np.max(lengths)),
    }


def output_consistency(preds: Sequence[Record]) -> float:
    """Coefficient of variation of prediction lengths (0 when the mean length is 0)."""
    s = length_stats(preds)
    return s["std_length"] / s["avg_length"] if s["avg_length"] else 0.0


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    """The shared RougeScorer with stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(preds: Sequence[Record], refs: Sequence[Record]) -> dict[str, float]:
    """Mean ROUGE F-measures over examples whose two texts are both non-empty (0 if none)."""
    scorer = _rouge_scorer()
    per_type: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for p, r in zip(preds, refs):
        pt, rt = record_text(p), record_text(r)
        if pt and rt:
            scores = scorer.score(rt, pt)
            for t in ROUGE_TYPES:
                per_type[t].append(scores[t].fmeasure)
    return {t: float(np.mean(v)) if v else 0.0 for t, v in per_type.items()}


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0."""
    return num / den if den else 0.0


def sponsored_ad_metrics(preds: Sequence[Record], refs: Sequence[Record]) -> dict[str, float]:
    """Detection scores of 'Sponsored Ad' summaries, references as truth."""
    pairs = [(is_sponsored(p), is_sponsored(r)) for p, r in zip(preds, refs)]
    tp = sum(p and r for p, r in pairs)
    fp = sum(p and not r for p, r in pairs)
    tn = sum(not p and not r for p, r in pairs)
    fn = sum(not p and r for p, r in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "sponsored_ad_precision": precision,
        "sponsored_ad_recall": recall,
        "sponsored_ad_f1": _ratio(2 * precision * recall, precision + recall),
        "sponsored_ad_accuracy": _ratio(tp + tn, len(pairs)),
        "sponsored_ad_true_positives": tp,
        "sponsored_ad_false_positives": fp,
        "sponsored_ad_true_negatives": tn,
        "sponsored_ad_false_negatives": fn,
    }


def aggregate_metrics(
    preds: Sequence[Record],
    refs: Sequence[Record],
    extra: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The published aggregate dict (plus relevance_r2), with `extra` (e.g. BERTScore) merged in."""
    per = per_example_metrics(preds, refs)
    precision, recall = pooled_precision_recall(preds, refs)
    jac = {name: float(np.mean(per[f"jaccard_{name}"])) for name in FIELDS}
    out: dict[str, float] = {
        "field_f1_key_insights": float(np.mean(per["f1_key_insights"])),
        "field_f1_company_names": float(np.mean(per["f1_company_names"])),
        "field_f1_overall": float(np.mean(per["f1_overall"])),
        "field_f1_precision_overall": precision,
        "field_f1_recall_overall": recall,
        "jaccard_key_insights": jac["key_insights"],
        "jaccard_company_names": jac["company_names"],
        "jaccard_overall": (jac["key_insights"] + jac["company_names"]) / 2,
        "exact_match_rate": float(np.mean(per["exact_match"])),
        **relevance_metrics(preds, refs),
        **length_stats(preds),
        **rouge_scores(preds, refs),
        **sponsored_ad_metrics(preds, refs),
        "json_validation_rate": float(np.mean([p.is_valid_json for p in preds])),
    }
    clash = sorted(set(out) & set(extra or {}))
    if clash:
        raise ValueError(f"Extra metrics would overwrite computed ones: {', '.join(clash)}.")
    out.update(extra or {})
    return out


def classification_metrics(
    gold: Sequence[str],
    predicted: Sequence[str | None],
    labels: Sequence[str] = AGNEWS_LABELS,
) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1, confusion matrix (rows gold, columns predicted), unmatched.

    A prediction that is None or not one of `labels` is wrong and counted as unmatched;
    it appears in no confusion-matrix column but lowers its gold class's recall.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions.")
    if not gold:
        raise ValueError("No examples to score.")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({g for g in gold if g not in index})
    if unknown:
        raise ValueError(f"Gold labels not in the label set: {', '.join(unknown)}.")
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    unmatched = 0
    for g, p in zip(gold, predicted):
        if p in index:
            matrix[index[g], index[p]] += 1
        else:
            unmatched += 1
    support = np.array([sum(g == label for g in gold) for label in labels])
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = int(matrix[i, i])
        precision = _ratio(tp, int(matrix[:, i].sum()))
        recall = _ratio(tp, int(support[i]))
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(support[i]),
        }
    return {
        "accuracy": int(np.trace(matrix)) / len(gold),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "labels": list(labels),
        "unmatched": unmatched,
        "n": len(gold),
    }
