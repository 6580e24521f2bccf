"""The Markdown of a comparison: the metric table and the report that ties table, plots and tests together."""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from newsray.evaluate.stats import ALPHA
from newsray.tasks import task_type
from newsray.tasks.agnews import AgNewsTask
from newsray.tasks.news import NewsTask

# The news metric rows (aggregate key, label, format pct | f3 | f2 | int, better high | low | None): the task's own list
NEWS_ROWS: tuple[tuple[str, str, str, str | None], ...] = tuple((m.key, m.label, m.fmt, m.better) for m in NewsTask.metrics)
LOWER_IS_BETTER = {"mae_relevance"}
PLOT_TITLES: dict[str, str] = {
    "json_validity": "JSON validity",
    "f1_by_field": "F1 by field",
    "precision_recall": "Pooled precision and recall",
    "relevance_error": "Relevance error distribution",
    "length_boxplot": "Response length",
    "rouge": "ROUGE",
    "bertscore": "BERTScore",
    "effect_sizes_forest": "Effect sizes (Cohen's d) with bootstrap CIs",
    "summary_heatmap": "Summary heatmap",
    "accuracy": "Accuracy",
    "per_class_f1": "Per-class F1",
    "accuracy_difference_forest": "Accuracy differences with bootstrap CIs",
}


def fmt(value: Any, kind: str = "f3") -> str:
    """A number as the table shows it."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "int":
        return f"{round(value)}"
    return f"{value:.2f}" if kind == "f2" else f"{value:.3f}"


def pval(p: float) -> str:
    """A p-value, scientific below 0.001."""
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def news_table(comparison: Mapping[str, Any]) -> str:
    """Metrics x models, the best value of each row in bold."""
    names, agg = comparison["models"], comparison["metrics"]
    rows = []
    for key, label, kind, better in NEWS_ROWS:
        values = [agg[n].get(key) for n in names]
        cells = [fmt(v, kind) for v in values]
        known = [v for v in values if v is not None]
        if better and len(set(known)) > 1:
            best = max(known) if better == "high" else min(known)
            cells = [f"**{c}**" if v == best else c for c, v in zip(cells, values)]
        rows.append([label, *cells])
    return _table(["metric", *names], rows)


def _magnitude(d: float | None) -> str:
    if d is None or not math.isfinite(d):
        return "undefined (zero variance)"
    a = abs(d)
    return "negligible" if a < 0.2 else "small" if a < 0.5 else "medium" if a < 0.8 else "large"


def _d(d: float | None) -> str:
    return "±∞" if d is None or not math.isfinite(d) else f"{d:+.2f}"


def news_inference(comparison: Mapping[str, Any], inference: Mapping[str, Any]) -> str:
    """Per pair: a table of every test, then the findings in words (with a Bonferroni check)."""
    n_tests = sum(len(v) for v in inference.values())
    bonf = ALPHA / n_tests
    parts = []
    for pair, by_metric in inference.items():
        m1, m2 = comparison["pair_names"][pair]
        rows, said = [], []
        for metric, r in by_metric.items():
            if r.get("not_computable"):
                rows.append([metric, fmt(r["model1_mean"]), fmt(r["model2_mean"]), f"{r['mean_difference']:+.3f}",
                             *[r["not_computable"]] * 5])
                said.append(f"- {metric}: no test, {r['not_computable']}.")
                continue
            ci = comparison["cohens_d_bootstrap_ci"][pair][metric]
            d = r["effect_sizes"]["cohens_d"]
            rows.append([metric, fmt(r["model1_mean"]), fmt(r["model2_mean"]), f"{r['mean_difference']:+.3f}",
                         f"[{r['confidence_interval']['lower']:+.3f}, {r['confidence_interval']['upper']:+.3f}]",
                         pval(r["paired_ttest"]["pvalue"]), pval(r["wilcoxon_test"]["pvalue"]),
                         f"{_d(d)} [{_d(ci['lower'])}, {_d(ci['upper'])}]", f"{r['statistical_power']:.2f}"])
            p_t, p_w = r["paired_ttest"]["pvalue"], r["wilcoxon_test"]["pvalue"]
            if r["paired_ttest"]["significant"]:
                higher_better = metric not in LOWER_IS_BETTER
                winner = m2 if (r["mean_difference"] > 0) == higher_better else m1
                agree = "Wilcoxon agrees" if r["wilcoxon_test"]["significant"] else f"but Wilcoxon does not (p = {pval(p_w)})"
                keep = "; survives Bonferroni" if p_t < bonf else "; not after Bonferroni"
                said.append(f"- **{metric}**: {winner} is better ({fmt(r['model1_mean'])} vs {fmt(r['model2_mean'])}); "
                            f"t-test p = {pval(p_t)}, {agree}; Cohen's d = {_d(d)} ({_magnitude(d)}){keep}.")
            else:
                power = r["statistical_power"]
                under = f"; power at this d only {power:.2f}: a real effect of this size would be missed {100 * (1 - power):.0f}% of the time" if power < 0.8 else ""
                said.append(f"- {metric}: no significant difference (t-test p = {pval(p_t)}, Wilcoxon p = {pval(p_w)}; "
                            f"d = {_d(d)}, {_magnitude(d)}){under}.")
        header = ["metric", f"{m1} mean", f"{m2} mean", f"diff ({m2} − {m1})", f"95% CI of {m1} − {m2}",
                  "t-test p", "Wilcoxon p", "Cohen's d [95% CI]", "power"]
        parts.append(f"### {m1} vs {m2}\n\n" + _table(header, rows) + "\n" + "\n".join(said) + "\n")
    intro = (f"Paired tests per example (n = {comparison['n']}) on the per-example metrics, α = {ALPHA}: "
             f"paired t-test (scipy `ttest_rel`), Wilcoxon signed-rank (scipy `wilcoxon`, defaults), Cohen's d with the "
             f"pooled SD (positive = model1 higher), power of the two-sided paired t-test at that d. The CI of the mean "
             f"difference and of d are percentile bootstraps over examples, seed {comparison['bootstrap']['seed']}, "
             f"{comparison['bootstrap']['resamples']} resamples. {n_tests} tests in all: the Bonferroni threshold is "
             f"{pval(bonf)}. For relevance MAE lower is better.\n\n")
    return intro + "\n".join(parts)


def agnews_table(comparison: Mapping[str, Any]) -> str:
    """Accuracy, macro F1, unmatched, then per-class P/R/F1 for every model."""
    names, cls = comparison["models"], comparison["metrics"]
    head = _table(["metric", *names], [*[[m.label, *[fmt(cls[n][m.key], m.fmt) for n in names]] for m in AgNewsTask.metrics],
                                       ["Examples", *[str(cls[n]["n"]) for n in names]]])
    labels = cls[names[0]]["labels"]
    rows = [[c, *[f"{cls[n]['per_class'][c]['precision']:.2f} / {cls[n]['per_class'][c]['recall']:.2f} / "
                  f"{cls[n]['per_class'][c]['f1']:.2f}" for n in names], str(cls[names[0]]["per_class"][c]["support"])] for c in labels]
    return head + "\nPer class, precision / recall / F1:\n\n" + _table(["class", *names, "support"], rows)


def agnews_inference(comparison: Mapping[str, Any], inference: Mapping[str, Any]) -> str:
    """McNemar's exact test per pair, in a table and in words."""
    rows, said = [], []
    for pair, block in inference.items():
        m1, m2 = comparison["pair_names"][pair]
        r = block["accuracy"]
        t, ci = r["mcnemar_exact"], r["confidence_interval"]
        rows.append([f"{m1} vs {m2}", fmt(r["model1_accuracy"], "pct"), fmt(r["model2_accuracy"], "pct"),
                     str(t["model1_only_correct"]), str(t["model2_only_correct"]), pval(t["pvalue"]),
                     f"[{100 * ci['lower']:+.1f}, {100 * ci['upper']:+.1f}] pts"])
        better = m1 if r["model1_accuracy"] > r["model2_accuracy"] else m2
        verdict = f"**{better} is significantly more accurate**" if t["significant"] else "no significant difference"
        said.append(f"- {m1} vs {m2}: {verdict} (McNemar exact p = {pval(t['pvalue'])}; {t['model1_only_correct']} examples "
                    f"only {m1} got right, {t['model2_only_correct']} only {m2}).")
    intro = (f"McNemar's exact test on per-example correctness (n = {comparison['n']}): among the discordant examples "
             f"(right for one model, wrong for the other), the count of each kind is Binomial(b + c, 1/2) under the null of "
             f"equal accuracy; p is scipy `binomtest(b, b + c, 0.5)`, two-sided, α = {ALPHA}. The CI is a percentile bootstrap "
             f"of the accuracy difference, seed {comparison['bootstrap']['seed']}, {comparison['bootstrap']['resamples']} resamples.\n\n")
    header = ["pair", "model1 acc.", "model2 acc.", "only model1 right (b)", "only model2 right (c)", "McNemar p", "95% CI of model1 − model2"]
    return intro + _table(header, rows) + "\n" + "\n".join(said) + "\n"


def _sources(comparison: Mapping[str, Any]) -> str:
    rows = []
    for n in comparison["models"]:
        s = comparison["sources"][n]
        info = s.get("eval_info") or {}
        rows.append([n, f"`{s['source']}`", str(info.get("model_ref", "–")), str(info.get("constrained", "–")),
                     str(info.get("n", "–")), fmt(info["wall_s"], "f2") if isinstance(info.get("wall_s"), (int, float)) else "–"])
    return _table(["model", "source", "model_ref", "constrained", "n", "wall_s"], rows)


def render(comparison: dict[str, Any], inference: Mapping[str, Any], plot_paths: Sequence[str], sources: Sequence[str],
           references: Any = None) -> tuple[str, str]:
    """(comparison.md, report.md) for a news or AG News comparison."""
    names = comparison["models"]
    comparison["pair_names"] = {f"{a}_vs_{b}": (a, b) for i, a in enumerate(names) for b in names[i + 1:]}
    news = task_type(comparison["task"]).suite == "fields"
    table = news_table(comparison) if news else agnews_table(comparison)
    cmd = "newsray compare " + " ".join(shlex.quote(s) for s in sources) + "".join(f" --name {shlex.quote(n)}" for n in names)
    cmd += f" --references {shlex.quote(str(references))}" if references else ""
    lines = [f"# Comparison ({comparison['task']}): {', '.join(names)}", "",
             f"{comparison['n']} examples; created {comparison['created']}; MLflow run `{comparison['mlflow_run_id']}`.", ""]
    if news:
        lines += [f"**BERTScore model:** {comparison['bertscore_model']}.", ""]
    lines += [(f"**Bootstrap:** seed {comparison['bootstrap']['seed']}, {comparison['bootstrap']['resamples']} resamples, "
               f"{comparison['bootstrap']['method']}."), "", f"Reproduce: `{cmd}`", "", "## Sources", "", _sources(comparison),
              "## Metrics", "", table]
    if comparison.get("source_aggregate_mismatches"):
        bad = "; ".join(f"{n}: {', '.join(ks)}" for n, ks in comparison["source_aggregate_mismatches"].items())
        lines += [f"> Warning: recomputed metrics differ from the sources' own aggregates.json ({bad}); the table shows the recomputed ones.", ""]
    lines += ["## Statistical inference", "", news_inference(comparison, inference) if news else agnews_inference(comparison, inference),
              "## Plots", ""]
    for rel in plot_paths:
        stem = rel.rsplit("/", 1)[-1].removesuffix(".png")
        title = PLOT_TITLES.get(stem) or ("Confusion matrix: " + stem.removeprefix("confusion_") if stem.startswith("confusion_") else stem)
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    del comparison["pair_names"]
    return table, "\n".join(lines)
