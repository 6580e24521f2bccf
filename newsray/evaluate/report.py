"""`newsray compare`: the multi-model table, pairwise statistical inference, plots and a Markdown report.

Each source is an evaluation directory or an MLflow evaluation run. Every metric is recomputed
from predictions.json and references.json with the one metrics module, so that all models are
scored by the same code and the same BERTScore model. Outputs are staged in a temporary
directory and moved into place, then logged to one MLflow run (stage "compare").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from newsray.config import Config
from newsray.errors import DataError
from newsray.evaluate import markdown, plots
from newsray.evaluate.bertscore import bertscore_metrics
from newsray.evaluate.metrics import (
    STAT_METRICS,
    aggregate_metrics,
    classification_metrics,
    output_consistency,
    per_example_metrics,
    record_length,
)
from newsray.evaluate.sources import EvalSource, check_same, load_source, unique_names
from newsray.evaluate.stats import ALPHA, bootstrap_ci, pairwise_inference
from newsray.tasks import task_type

PLOTS_DIR = "plots"
NOT_FROM_SOURCE = ("bertscore", "semantic_similarity")  # recomputed with this run's BERTScore setting


@dataclass(frozen=True)
class CompareResult:
    """Where the comparison went and its headline numbers."""

    out_dir: Path
    task: str
    names: list[str]
    report: Path
    plots: list[Path]
    mlflow_run_id: str | None
    metrics: dict[str, dict[str, Any]]


def _finite(tree: Any) -> Any:
    """The JSON tree with non-finite floats (an infinite Cohen's d) written as null."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def cohens_d_ci(x: Sequence[float], y: Sequence[float], seed: int, n_resamples: int, level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap CI of Cohen's d (pooled SD, as stats.cohens_d), example indices resampled."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    ds = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):
        idx = rng.integers(0, len(xa), size=(min(1000, n_resamples - start), len(xa)))
        xs, ys = xa[idx], ya[idx]
        diff = xs.mean(axis=1) - ys.mean(axis=1)
        pooled = np.sqrt((xs.var(axis=1, ddof=1) + ys.var(axis=1, ddof=1)) / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(pooled > 0, diff / pooled, np.sign(diff) * np.inf)
        ds[start:start + len(d)] = np.nan_to_num(d, nan=0.0)
    tail = (1 - level) / 2 * 100
    lower, upper = np.percentile(ds, [tail, 100 - tail], method="nearest")
    return {"lower": float(lower), "upper": float(upper)}


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool], alpha: float = ALPHA) -> dict[str, Any]:
    """McNemar's exact test: a two-sided binomial test (p = 1/2) on the discordant pairs."""
    only_a = int(sum(x and not y for x, y in zip(a, b)))
    only_b = int(sum(y and not x for x, y in zip(a, b)))
    p = float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return {"model1_only_correct": only_a, "model2_only_correct": only_b, "statistic": min(only_a, only_b),
            "pvalue": p, "significant": bool(p < alpha)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bootstrap_note(cfg: Config, news: bool = True) -> str:
    note = (f"CI: 95% percentile bootstrap over examples, seed {cfg.eval.bootstrap_seed}, {cfg.eval.bootstrap_resamples} resamples. "
            f"Black-edged marker: {'paired t-test' if news else 'McNemar exact test'} p < {ALPHA}.")
    return note + (" Grey bands: |d| < 0.2 / 0.5 / 0.8. For mae_relevance lower is better (d > 0: model1 worse)." if news else "")


def _source_mismatches(src: EvalSource, ours: Mapping[str, Any]) -> list[str]:
    """Keys of the source's own aggregates.json that disagree with the recomputed values."""
    bad = []
    for k, v in (src.aggregates or {}).items():
        if (k in ours and not k.startswith(NOT_FROM_SOURCE) and isinstance(v, (int, float))
                and not math.isclose(float(v), float(ours[k]), rel_tol=1e-9, abs_tol=1e-12)):
            bad.append(k)
    return bad


def _news(cfg: Config, srcs: Sequence[EvalSource], names: Sequence[str], plot_dir: Path) -> tuple[dict, dict, list[Path]]:
    """News: aggregates (+ BERTScore), pairwise inference, Cohen's d CIs and the nine plots."""
    refs = srcs[0].references
    agg: dict[str, dict[str, Any]] = {}
    per: dict[str, dict[str, list[float]]] = {}
    model = ""
    for name, src in zip(names, srcs):
        bs = bertscore_metrics(src.predictions, refs, cfg.eval.bertscore_model, cfg.eval.bertscore_num_layers, cfg.eval.bertscore_text)
        agg[name] = aggregate_metrics(src.predictions, refs, extra=bs.metrics)
        agg[name]["output_consistency"] = output_consistency(src.predictions)
        per[name] = per_example_metrics(src.predictions, refs) | bs.per_example
        model = bs.model
    seed, resamples = cfg.eval.bootstrap_seed, cfg.eval.bootstrap_resamples
    inference = pairwise_inference({n: per[n] for n in names}, STAT_METRICS, seed=seed, n_resamples=resamples)
    d_ci: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for metric in STAT_METRICS:
        for m1, m2 in itertools.combinations(names, 2):  # the order of pairwise_inference
            pair = f"{m1}_vs_{m2}"
            by_metric = inference[pair]
            if by_metric[metric].get("not_computable"):  # n < 2: no d, no CI, no forest row
                d_ci.setdefault(pair, {})[metric] = {"cohens_d": None, "lower": None, "upper": None}
                continue
            ci = cohens_d_ci(per[m1][metric], per[m2][metric], seed, resamples)
            d = by_metric[metric]["effect_sizes"]["cohens_d"]
            d_ci.setdefault(pair, {})[metric] = {"cohens_d": d, **ci}
            rows.append({"label": metric, "pair": pair, "estimate": d, **ci,
                         "significant": by_metric[metric]["paired_ttest"]["significant"]})
    comparison = {
        "metrics": agg,
        "bertscore_model": model,
        "cohens_d_bootstrap_ci": d_ci,
        "source_aggregate_mismatches": {n: m for n, s in zip(names, srcs) if (m := _source_mismatches(s, agg[n]))},
    }
    ref_lengths = [record_length(r) for r in refs]
    paths = plots.news_plots(plot_dir, names, agg, per, ref_lengths, rows, list(inference), model, _bootstrap_note(cfg))
    return comparison, inference, paths


def _agnews(cfg: Config, srcs: Sequence[EvalSource], names: Sequence[str], plot_dir: Path) -> tuple[dict, dict, list[Path]]:
    """AG News: classification metrics, McNemar's exact test + bootstrap CI per pair, and the plots."""
    gold = [r["gold"] for r in srcs[0].references]
    cls = {n: classification_metrics(gold, [p.get("predicted") for p in s.predictions]) for n, s in zip(names, srcs)}
    correct = {n: [p.get("predicted") == g for p, g in zip(s.predictions, gold)] for n, s in zip(names, srcs)}
    inference: dict[str, dict[str, Any]] = {}
    rows = []
    for i, m1 in enumerate(names):
        for m2 in names[i + 1:]:
            x, y = np.asarray(correct[m1], dtype=float), np.asarray(correct[m2], dtype=float)
            ci = bootstrap_ci(x, y, cfg.eval.bootstrap_seed, cfg.eval.bootstrap_resamples, 1 - ALPHA)
            test = mcnemar_exact(correct[m1], correct[m2])
            pair = f"{m1}_vs_{m2}"
            inference[pair] = {"accuracy": {
                "metric_name": "accuracy", "model1_accuracy": float(x.mean()), "model2_accuracy": float(y.mean()),
                "accuracy_difference": float(x.mean() - y.mean()), "mcnemar_exact": test,
                "confidence_interval": ci, "n": len(x),
            }}
            rows.append({"label": "accuracy", "pair": pair, "estimate": float(x.mean() - y.mean()), **ci,
                         "significant": test["significant"]})
    comparison = {"metrics": cls, "unmatched": {n: cls[n]["unmatched"] for n in names}}
    paths = plots.agnews_plots(plot_dir, names, cls, rows, list(inference), _bootstrap_note(cfg, news=False))
    return comparison, inference, paths


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged report into out_dir: one rename if it is new; else its four files are replaced one by
    one (atomically) and its plots/ directory as a whole, so no plot of an earlier report stays; other files
    in out_dir are left alone."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = out_dir / f".{PLOTS_DIR}.old-{os.getpid()}"
    if (out_dir / PLOTS_DIR).exists():
        os.replace(out_dir / PLOTS_DIR, old)
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):
        dest = out_dir / f.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _default_out(cfg: Config) -> Path:
    base = Path(cfg.tracking.run_dir) / "compare" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def _log_mlflow(comparison: Mapping[str, Any], out_dir: Path) -> None:
    """Headline metrics per model and every output file, into the active run."""
    import mlflow

    metrics = {}
    for name, values in comparison["metrics"].items():
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                metrics[f"{plots.slug(name)}.{k}"] = float(v)
    mlflow.log_metrics(metrics)
    mlflow.log_artifacts(str(out_dir), artifact_path="compare")


def compare(cfg: Config, sources: list[str], names: list[str] | None = None, out_dir: Path | None = None,
            references: Path | None = None) -> CompareResult:
    """Compare two or more evaluations (directories, MLflow run ids, or news prediction files + references)."""
    from newsray import tracking

    if len(sources) < 2:
        raise DataError(f"compare needs at least two evaluations, got {len(sources)}; pass two or more run ids or directories.")
    if names is not None and len(names) != len(sources):
        raise DataError(f"{len(names)} --name value(s) for {len(sources)} sources; give one name per source or none.")
    if names is not None and len(set(names)) != len(names):
        raise DataError(f"--name values must be unique, got {', '.join(names)}.")
    uri = tracking.tracking_uri(cfg)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="newsray-compare-") as work:
        srcs = [load_source(s, names[i] if names else None, uri, Path(work), references) for i, s in enumerate(sources)]
        names = list(names) if names else unique_names([s.name for s in srcs])
        for name, src in zip(names, srcs):
            src.name = name
        task = check_same(srcs)
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.data.task = task  # type: ignore[assignment]
        out_dir = Path(out_dir) if out_dir is not None else _default_out(cfg)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"{out_dir}: exists and is not a directory; choose another --out.")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the published directory should not be
        run_ids = [s.run_id for s in srcs if s.run_id]
        try:
            with tracking.start_run(run_cfg, run_name=f"compare-{'-vs-'.join(names)}"[:250], stage="compare",
                                    data_hashes={"references": _sha256(srcs[0].path / "references.json")}) as run:
                import mlflow

                mlflow.set_tags({"newsray.compare.models": ",".join(names), "newsray.compare.sources": json.dumps(sources),
                                 "newsray.compared_runs": ",".join(run_ids),
                                 **{f"newsray.compare.model.{i}": f"{n}={s}" for i, (n, s) in enumerate(zip(names, sources))}})
                build = {"fields": _news, "labels": _agnews}[task_type(task).suite]
                comparison, inference, paths = build(cfg, srcs, names, staging / PLOTS_DIR)
                comparison = {
                    "task": task, "models": names, "n": len(srcs[0].references),
                    "created": datetime.now().astimezone().isoformat(timespec="seconds"),
                    "sources": {n: {"source": s.source, "run_id": s.run_id, "eval_info": s.info} for n, s in zip(names, srcs)},
                    "bootstrap": {"seed": cfg.eval.bootstrap_seed, "resamples": cfg.eval.bootstrap_resamples, "level": 1 - ALPHA,
                                  "method": "percentile; example indices resampled with replacement"},
                    "mlflow_run_id": run.info.run_id, **comparison,
                }
                if comparison.get("bertscore_model"):
                    mlflow.set_tag("newsray.bertscore_model", comparison["bertscore_model"])
                rel = [f"{PLOTS_DIR}/{p.name}" for p in paths]
                table_md, report_md = markdown.render(comparison, inference, rel, sources, references)
                _write_json(staging / "comparison.json", comparison)
                _write_json(staging / "statistical_inference.json", inference)
                (staging / "comparison.md").write_text(table_md, encoding="utf-8")
                (staging / "report.md").write_text(report_md, encoding="utf-8")
                _publish(staging, out_dir)
                _log_mlflow(comparison, out_dir)
                mlflow.log_metric("wall_s", time.time() - started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return CompareResult(out_dir, task, names, out_dir / "report.md", [out_dir / r for r in rel],
                         run.info.run_id, comparison["metrics"])
