"""Golden test of the metrics against the published three-model comparison, plus edge cases."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from newsray.errors import DataError
from newsray.evaluate.metrics import (
    Record,
    aggregate_metrics,
    classification_metrics,
    per_example_metrics,
    pooled_precision_recall,
    rouge_scores,
    set_scores,
    sponsored_ad_metrics,
)
from newsray.evaluate.scoring import load_records, score_files
from newsray.evaluate.stats import bootstrap_ci, compare_metric, pairwise_inference

STAMP = "20251111_084543"
MODEL_FILES = {
    "baseline": "baseline_parsed_predictions.json",
    "tinker": "tinker_predictions_standardized.json",
    "unsloth": "unsloth_predictions_standardized.json",
}
REFERENCES = "test_references_standardized.json"
NOT_REPRODUCED = {"semantic_similarity", "bertscore_precision", "bertscore_recall", "bertscore_f1"}
# Bootstrap CIs use an unpublished seed: each bound must lie within this share of the CI width.
CI_TOLERANCE = 0.15


def approx(value: float) -> Any:
    """The golden tolerance."""
    return pytest.approx(value, rel=1e-9, abs=1e-12)


def _data_dir() -> Path:
    """NEWSRAY_DATA_DIR, else ../shared/data next to the project root; fail if absent."""
    env = os.environ.get("NEWSRAY_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    eval_dir = (root / "news" / "published_eval").resolve()
    if not eval_dir.is_dir():
        source = "NEWSRAY_DATA_DIR" if env else "the default ../shared/data"
        pytest.fail(f"Published evaluation files not found: looked in {eval_dir} (from {source}).")
    return eval_dir


@pytest.fixture(scope="module")
def eval_dir() -> Path:
    return _data_dir()


@pytest.fixture(scope="module")
def published(eval_dir: Path) -> dict[str, Any]:
    names = {"aggregated": "aggregated", "per_example": "per_example"}
    out = {
        key: json.loads((eval_dir / f"three_model_quality_metrics_{name}_{STAMP}.json").read_text())
        for key, name in names.items()
    }
    stats_file = eval_dir / f"three_model_statistical_inference_{STAMP}.json"
    out["stats"] = json.loads(stats_file.read_text())
    return out


@pytest.fixture(scope="module")
def ours(eval_dir: Path) -> dict[str, Any]:
    refs = load_records(eval_dir / REFERENCES)
    preds = {m: load_records(eval_dir / f) for m, f in MODEL_FILES.items()}
    per_example = {m: per_example_metrics(p, refs) for m, p in preds.items()}
    return {
        "aggregated": {
            m: score_files(eval_dir / f, eval_dir / REFERENCES) for m, f in MODEL_FILES.items()
        },
        "per_example": per_example,
        "stats": pairwise_inference(per_example),
        "n": len(refs),
    }


# ---------------------------------------------------------------- golden


def test_aggregate_keys_are_the_published_ones(published: dict, ours: dict) -> None:
    for model, pub in published["aggregated"].items():
        expected = (set(pub) - NOT_REPRODUCED) | {"relevance_r2"}
        assert set(ours["aggregated"][model]) == expected, model


@pytest.mark.parametrize("model", list(MODEL_FILES))
def test_aggregates_match_published(published: dict, ours: dict, model: str) -> None:
    pub, mine = published["aggregated"][model], ours["aggregated"][model]
    for key, value in pub.items():
        if key in NOT_REPRODUCED:
            continue
        assert mine[key] == approx(value), f"{model}.{key}"
    n = ours["n"]
    adjusted = 1 - (1 - mine["relevance_r2"]) * (n - 1) / (n - 2)
    assert mine["relevance_adjusted_r2"] == approx(adjusted)


@pytest.mark.parametrize("model", list(MODEL_FILES))
def test_per_example_match_published(published: dict, ours: dict, model: str) -> None:
    for key, values in published["per_example"][model].items():
        mine = ours["per_example"][model][key]
        assert len(mine) == len(values), f"{model}.{key}"
        for i, (a, b) in enumerate(zip(mine, values)):
            assert a == approx(b), f"{model}.{key}[{i}]"


def compare_tree(mine: Any, pub: Any, path: str) -> None:
    """Compare two JSON trees leaf by leaf (CIs approximately)."""
    if isinstance(pub, dict):
        assert set(mine) == set(pub), path
        if set(pub) == {"lower", "upper"}:
            width = pub["upper"] - pub["lower"]
            for k in pub:
                assert abs(mine[k] - pub[k]) <= CI_TOLERANCE * width, f"{path}.{k}"
            return
        for k in pub:
            compare_tree(mine[k], pub[k], f"{path}.{k}")
    elif isinstance(pub, (bool, str)):
        assert mine == pub and type(mine) is type(pub), path
    else:
        assert mine == approx(pub), path


def test_statistical_inference_matches_published(published: dict, ours: dict) -> None:
    assert list(ours["stats"]) == list(published["stats"])
    compare_tree(ours["stats"], published["stats"], "stats")


def test_inference_is_json_serialisable(ours: dict) -> None:
    json.dumps(ours["stats"], allow_nan=False)
    json.dumps(ours["aggregated"], allow_nan=False)


# ---------------------------------------------------------------- edge cases


def rec(rel: float = 5, ki: tuple = (), cn: tuple = (), summary: str = "") -> Record:
    return Record(float(rel), tuple(ki), tuple(cn), summary)


def test_set_scores_edge_cases() -> None:
    both = set_scores([], [])
    assert (both.precision, both.recall, both.f1, both.jaccard) == (1, 1, 1, 1)
    assert both.both_empty
    for pred, ref in (([], ["a"]), (["a"], [])):
        s = set_scores(pred, ref)
        assert (s.precision, s.recall, s.f1, s.jaccard, s.both_empty) == (0, 0, 0, 0, False)
    assert set_scores(["a", "a", "b"], ["b", "a"]).f1 == 1.0  # duplicates dropped
    s = set_scores(["a", "b"], ["b", "c", "d"])
    assert (s.precision, s.recall, s.f1, s.jaccard) == approx((1 / 2, 1 / 3, 0.4, 1 / 4))
    assert set_scores(["A"], ["a"]).f1 == 0.0  # exact string comparison


def test_invalid_record_normalisation() -> None:
    raw = {"is_valid_json": False, "relevance_score": 7, "key_insights": ["x"], "summary": "s"}
    assert Record.from_dict(raw) == Record.invalid()
    assert Record.from_dict(None) == Record(0.0, (), (), "", False)
    per = per_example_metrics([Record.invalid()], [rec(4, ["a"], [])])
    assert per["f1_key_insights"] == [0.0] and per["f1_company_names"] == [1.0]
    assert per["mae_relevance"] == [4.0] and per["length"] == [0.0]


def test_pooled_precision_recall_leaves_out_both_empty_pairs() -> None:
    preds = [rec(ki=["a", "b"]), rec()]
    refs = [rec(ki=["a"], cn=["c"]), rec()]
    # pairs: key_insights P=1/2 R=1; company_names P=0 R=0; example 2 both empty twice (left out)
    assert pooled_precision_recall(preds, refs) == approx((0.25, 0.5))


def test_aggregates_small_example() -> None:
    preds = [rec(5, ["a"], ["X"], "Sponsored ad here"), Record.invalid()]
    refs = [rec(5, ["a"], ["X"], "Sponsored ad here"), rec(3, [], [], "SPONSORED AD")]
    agg = aggregate_metrics(preds, refs, extra={"bertscore_f1": 0.5})
    assert agg["exact_match_rate"] == 0.5 and agg["json_validation_rate"] == 0.5
    assert agg["field_f1_overall"] == 1.0  # example 2: both sets empty on both fields
    assert agg["relevance_mae"] == 1.5 and agg["bertscore_f1"] == 0.5
    assert (agg["sponsored_ad_true_positives"], agg["sponsored_ad_false_negatives"]) == (1, 1)
    assert agg["sponsored_ad_recall"] == 0.5 and agg["sponsored_ad_precision"] == 1.0
    assert agg["min_length"] == 0.0 and agg["max_length"] == len("aXSponsored ad here")
    with pytest.raises(ValueError, match="overwrite"):
        aggregate_metrics(preds, refs, extra={"rouge1": 1.0})


def test_rouge_averages_only_nonempty_pairs() -> None:
    preds = [rec(ki=["AI Model"]), rec(), rec(ki=["x"])]
    refs = [rec(ki=["AI Model"]), rec(ki=["y"]), rec()]
    assert rouge_scores(preds, refs)["rouge1"] == 1.0
    assert rouge_scores([rec()], [rec()])["rouge2"] == 0.0


def test_sponsored_ad_zero_denominators() -> None:
    m = sponsored_ad_metrics([rec()], [rec()])
    assert m["sponsored_ad_precision"] == m["sponsored_ad_f1"] == 0.0
    assert m["sponsored_ad_accuracy"] == 1.0


def test_classification_metrics_hand_computed() -> None:
    gold = ["World", "World", "Sports", "Business", "Sci/Tech", "Sci/Tech"]
    pred = ["World", "Sports", "Sports", None, "Sci/Tech", "banana"]
    m = classification_metrics(gold, pred)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["unmatched"] == 2 and m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    world, sports = m["per_class"]["World"], m["per_class"]["Sports"]
    assert world == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert sports["precision"] == 0.5 and sports["recall"] == 1.0
    assert m["per_class"]["Business"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["Sci/Tech"]["recall"] == 0.5
    with pytest.raises(ValueError):
        classification_metrics(["Nope"], ["World"])


def test_stats_edge_cases() -> None:
    same = compare_metric([1.0, 0.0, 0.5], [1.0, 0.0, 0.5], "f1_overall", n_resamples=200)
    assert same["paired_ttest"] == {"statistic": 0.0, "pvalue": 1.0, "significant": False}
    assert same["wilcoxon_test"]["pvalue"] == 1.0 and same["effect_sizes"]["cohens_d"] == 0.0
    x, y = [0.1, 0.5, 0.9, 0.3], [0.2, 0.4, 1.0, 0.6]
    ci = bootstrap_ci(x, y, seed=7, n_resamples=500)
    assert ci == bootstrap_ci(x, y, seed=7, n_resamples=500) and ci["lower"] <= ci["upper"]
    one = compare_metric([1.0], [2.0], "m")  # n = 1: the means, and every test "not computable (n < 2)"
    assert one["not_computable"] == "not computable (n < 2)" and one["paired_ttest"] is None and one["statistical_power"] is None
    assert (one["model1_mean"], one["model2_mean"], one["mean_difference"]) == (1.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="paired samples differ"):
        compare_metric([1.0, 2.0], [2.0], "m")


# ---------------------------------------------------------------- file errors


def _write(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records))
    return path


def _raw(i: int, **kw: Any) -> dict:
    base = {"id": i, "example_id": i, "relevance_score": 5, "key_insights": [], "company_names": [],
            "summary": "", "is_valid_json": True}
    return {**base, **kw}


def test_mismatched_lengths_raise_data_error(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.json", [_raw(0), _raw(1)])
    r = _write(tmp_path / "r.json", [_raw(0)])
    with pytest.raises(DataError, match="2 records"):
        score_files(p, r)


def test_mismatched_ids_name_first_position(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.json", [_raw(0), _raw(5), _raw(6)])
    r = _write(tmp_path / "r.json", [_raw(0), _raw(1), _raw(2)])
    with pytest.raises(DataError, match="position 1"):
        score_files(p, r)


def test_load_records_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.json"):
        load_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DataError, match="bad.json"):
        load_records(bad)
    lacking = {k: v for k, v in _raw(0).items() if k != "summary"}
    with pytest.raises(DataError, match="summary"):
        load_records(_write(tmp_path / "lacks.json", [lacking]))
    invalid_only = _write(tmp_path / "inv.json", [{"is_valid_json": False}])
    assert load_records(invalid_only) == [Record.invalid()]
