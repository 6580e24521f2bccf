"""The comparison plots as PNGs (matplotlib, Agg): one colour per model throughout."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from newsray.tasks.news import NewsTask

REFERENCE_COLOR = "#8c8c8c"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
DPI = 110

# (aggregate key, column label, how to put it on a 0-1 "higher is better" colour scale): the news task's heatmap metrics
HEATMAP_METRICS: tuple[tuple[str, str, str], ...] = tuple((m.key, *m.heatmap) for m in NewsTask.metrics if m.heatmap)
MAE_SCALE = 10.0  # relevance runs 1-10 (0 for invalid output): the largest possible error


def model_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per model, by position."""
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}


def slug(name: str) -> str:
    """A file-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _figure(width: float = 7.5, height: float = 4.5) -> tuple[Any, Any]:
    """A standalone Agg figure and its axes (no pyplot global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as PNG."""
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _grouped(ax: Any, categories: Sequence[str], series: Mapping[str, Sequence[float]], colors: Mapping[str, str],
             fmt: str = "{:.3f}", ylim: tuple[float, float] | None = (0, 1.08),
             labels: Mapping[str, str] | None = None, hide_zero: bool = False) -> None:
    """Grouped bars: one group per category, one bar per model, value printed on each bar."""
    k = len(series)
    width = 0.8 / k
    x = np.arange(len(categories))
    for j, (name, values) in enumerate(series.items()):
        pos = x - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, values, width * 0.95, label=textwrap.fill((labels or {}).get(name, name), 32), color=colors[name])
        size = 8 if k * len(categories) <= 12 else 7
        texts = ["" if hide_zero and v == 0 else fmt.format(v) for v in values]
        ax.bar_label(bars, labels=texts, padding=2, fontsize=size)
    ax.set_xticks(x, categories)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="model", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _tilt(ax: Any, names: Sequence[str]) -> None:
    """Slant the x tick labels when model names are long enough to collide."""
    if max(map(len, names)) > 12:
        ax.tick_params(axis="x", labelrotation=20)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")


def _bars(path: Path, title: str, ylabel: str, names: Sequence[str], values: Sequence[float],
          colors: Mapping[str, str], fmt: str, ylim: tuple[float, float] | None = None) -> Path:
    """One bar per model."""
    fig, ax = _figure(6.5, 4.2)
    bars = ax.bar(list(names), values, color=[colors[n] for n in names], width=0.6)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("model")
    _tilt(ax, names)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def _heat_value(value: float, scale: str) -> float:
    """A metric on a 0-1 scale where 1 is best (MAE as 1 - MAE/10, R² clipped below at 0)."""
    if scale == "mae":
        return float(np.clip(1 - value / MAE_SCALE, 0, 1))
    return float(np.clip(value, 0, 1))


def summary_heatmap(path: Path, names: Sequence[str], agg: Mapping[str, Mapping[str, float]]) -> Path:
    """Models x key metrics, coloured on a common 0-1 better-is-higher scale, annotated with raw values."""
    cols = [c for c in HEATMAP_METRICS if all(c[0] in agg[n] for n in names)]
    raw = np.array([[agg[n][k] for k, _, _ in cols] for n in names], dtype=float)
    scaled = np.array([[_heat_value(v, s) for v, (_, _, s) in zip(row, cols)] for row in raw])
    fig, ax = _figure(max(7.5, 0.95 * len(cols) + 2), 1.2 + 0.65 * len(names))
    im = ax.imshow(scaled, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [label for _, label, _ in cols], fontsize=8)
    ax.set_yticks(range(len(names)), list(names))
    for i in range(len(names)):
        for j in range(len(cols)):
            color = "black" if 0.25 < scaled[i, j] < 0.8 else "white"
            ax.text(j, i, f"{raw[i, j]:.3f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title("Summary: colour = score on a 0–1 scale, 1 best (MAE as 1 − MAE/10, R² clipped at 0); numbers = raw values", fontsize=9)
    fig.colorbar(im, ax=ax, label="normalised score (1 = best)", shrink=0.9)
    return _save(fig, path)


def forest(path: Path, title: str, rows: Sequence[dict[str, Any]], xlabel: str, pairs: Sequence[str], note: str,
           min_span: float = 1.0) -> Path:
    """A forest plot: one row per (metric, pair) with a point estimate and a CI, coloured by pair."""
    pair_colors = {p: _PALETTE[(i + 3) % len(_PALETTE)] for i, p in enumerate(pairs)}
    fig, ax = _figure(8.5, 1.8 + 0.32 * len(rows))
    y = np.arange(len(rows))[::-1]
    finite = [abs(v) for r in rows for v in (r["estimate"], r["lower"], r["upper"]) if v is not None and math.isfinite(v)]
    span = max(min_span, max(finite, default=min_span))

    def clip(v: float | None) -> float:
        return float("nan") if v is None else float(np.clip(v, -span * 1.05, span * 1.05))

    for yi, r in zip(y, rows):
        c = pair_colors[r["pair"]]
        ax.plot([clip(r["lower"]), clip(r["upper"])], [yi, yi], color=c, lw=2)
        ax.plot(clip(r["estimate"]), yi, "o", color=c, ms=8 if r["significant"] else 5,
                markeredgecolor="black" if r["significant"] else c)
    if not rows:  # nothing estimable (n < 2): the figure says so instead of plotting nothing
        ax.text(0, 0.5, "no estimate: not computable (n < 2)", ha="center", va="center", transform=ax.get_yaxis_transform())
    for k in range(len(pairs), len(rows), len(pairs)):  # a rule between metrics
        ax.axhline(y[k] + 0.5, color="#bbbbbb", lw=0.6)
    ax.axvline(0, color="black", lw=0.8)
    if "Cohen" in xlabel:  # shade |d| < 0.2 / 0.5 / 0.8: negligible / small / medium
        for edge in (0.2, 0.5, 0.8):
            ax.axvspan(-edge, edge, color="grey", alpha=0.06, lw=0)
    group = len(pairs)  # rows come grouped by metric, one row per pair: name each group once
    ax.set_yticks(y, [r["label"] if i % group == group // 2 else "" for i, r in enumerate(rows)], fontsize=9)
    ax.tick_params(axis="y", length=0)
    ax.set_xlim(-span * 1.1, span * 1.1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for p in pairs:
        ax.plot([], [], color=pair_colors[p], lw=2, marker="o", label=textwrap.fill(p.replace("_vs_", " vs "), 32))
    ax.plot([], [], "o", color="white", markeredgecolor="black", ms=8, label="significant (p < 0.05)")
    ax.legend(title="pair (model1 vs model2)", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.supxlabel(textwrap.fill(note, 140), fontsize=7, color="#444444")
    return _save(fig, path)


def news_plots(out: Path, names: Sequence[str], agg: Mapping[str, Mapping[str, float]],
               per: Mapping[str, Mapping[str, Sequence[float]]], ref_lengths: Sequence[float],
               forest_rows: Sequence[dict[str, Any]], pairs: Sequence[str], bertscore_model: str,
               bootstrap_note: str) -> list[Path]:
    """The nine news-comparison plots, written into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    colors = model_colors(names)
    paths = [_bars(out / "json_validity.png", "JSON validity: share of outputs that parse into the record", "valid JSON (%)",
                   names, [100 * agg[n]["json_validation_rate"] for n in names], colors, "{:.1f}%", (0, 110))]

    fig, ax = _figure()
    _grouped(ax, ["key_insights", "company_names", "overall"],
             {n: [agg[n]["field_f1_key_insights"], agg[n]["field_f1_company_names"], agg[n]["field_f1_overall"]] for n in names}, colors)
    ax.set(title="Field F1 (set match per example, averaged)", xlabel="field", ylabel="F1")
    paths.append(_save(fig, out / "f1_by_field.png"))

    fig, ax = _figure()
    _grouped(ax, ["precision (pooled)", "recall (pooled)", "F1 overall"],
             {n: [agg[n]["field_f1_precision_overall"], agg[n]["field_f1_recall_overall"], agg[n]["field_f1_overall"]] for n in names}, colors)
    ax.set(title="Precision and recall over (example, field) pairs, both-empty pairs left out", xlabel="", ylabel="score")
    paths.append(_save(fig, out / "precision_recall.png"))

    fig, ax = _figure()
    errors = {n: np.asarray(per[n]["mae_relevance"], dtype=float) for n in names}
    top = math.ceil(max(float(e.max()) for e in errors.values())) + 1
    edges = np.arange(0, top + 1) - 0.5
    counts = {n: np.histogram(errors[n], bins=edges)[0].tolist() for n in names}
    _grouped(ax, [str(i) for i in range(top)], counts, colors, fmt="{:d}", ylim=None,
             labels={n: f"{n} (MAE {errors[n].mean():.2f})" for n in names}, hide_zero=True)
    ax.set(title="Relevance error: |reference − predicted| per example", xlabel="absolute error (relevance points)", ylabel="examples")
    paths.append(_save(fig, out / "relevance_error.png"))

    fig, ax = _figure()
    data = [np.asarray(per[n]["length"], dtype=float) for n in names] + [np.asarray(ref_lengths, dtype=float)]
    labels = list(names) + ["reference"]
    box = ax.boxplot(data, tick_labels=labels, patch_artist=True, showmeans=True, widths=0.55,
                     meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
                     medianprops={"color": "black"})
    _tilt(ax, labels)
    for patch, color in zip(box["boxes"], [colors[n] for n in names] + [REFERENCE_COLOR]):
        patch.set_facecolor(color)
        patch.set_alpha(0.75)
    ax.set(title="Response length: summary + key insights + company names", xlabel="", ylabel="characters")
    ax.grid(axis="y", alpha=0.3)
    ax.text(0.99, 0.97, "◇ mean, — median", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    paths.append(_save(fig, out / "length_boxplot.png"))

    fig, ax = _figure()
    _grouped(ax, ["ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"],
             {n: [agg[n][k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")] for n in names}, colors)
    ax.set(title="ROUGE F-measure of key insights + company names (both non-empty)", xlabel="", ylabel="F-measure")
    paths.append(_save(fig, out / "rouge.png"))

    fig, ax = _figure()
    _grouped(ax, ["precision", "recall", "F1", "semantic similarity"],
             {n: [agg[n][k] for k in ("bertscore_precision", "bertscore_recall", "bertscore_f1", "semantic_similarity")] for n in names}, colors)
    ax.set(title="BERTScore", xlabel="", ylabel="score")
    ax.text(0.0, -0.14, f"model: {bertscore_model}", transform=ax.transAxes, fontsize=7, color="#444444")
    paths.append(_save(fig, out / "bertscore.png"))

    paths.append(forest(out / "effect_sizes_forest.png", "Effect sizes: Cohen's d with 95% bootstrap CI", forest_rows,
                        "Cohen's d = (mean model1 − mean model2) / pooled SD", pairs, bootstrap_note))
    paths.append(summary_heatmap(out / "summary_heatmap.png", names, agg))
    return paths


def agnews_plots(out: Path, names: Sequence[str], cls: Mapping[str, Mapping[str, Any]],
                 forest_rows: Sequence[dict[str, Any]], pairs: Sequence[str], bootstrap_note: str) -> list[Path]:
    """Accuracy bars, per-class F1, a confusion-matrix heatmap per model and the accuracy-difference forest plot."""
    out.mkdir(parents=True, exist_ok=True)
    colors = model_colors(names)
    labels = list(cls[names[0]]["labels"])
    paths = [_bars(out / "accuracy.png", "AG News accuracy (unmatched answers count as wrong)", "accuracy (%)", names,
                   [100 * cls[n]["accuracy"] for n in names], colors, "{:.1f}%", (0, 110))]
    fig, ax = _figure()
    _grouped(ax, labels, {n: [cls[n]["per_class"][c]["f1"] for c in labels] for n in names}, colors)
    ax.set(title="Per-class F1", xlabel="class", ylabel="F1")
    paths.append(_save(fig, out / "per_class_f1.png"))
    for n in names:
        m = np.asarray(cls[n]["confusion_matrix"], dtype=int)
        fig, ax = _figure(5.6, 4.8)
        im = ax.imshow(m, cmap="Blues", vmin=0)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set(title=f"Confusion matrix: {n} (unmatched: {cls[n]['unmatched']} of {cls[n]['n']})", xlabel="predicted", ylabel="gold")
        fig.colorbar(im, ax=ax, label="examples", shrink=0.85)
        paths.append(_save(fig, out / f"confusion_{slug(n)}.png"))
    paths.append(forest(out / "accuracy_difference_forest.png", "Accuracy difference with 95% bootstrap CI", forest_rows,
                        "accuracy model1 − accuracy model2", pairs, bootstrap_note, min_span=0.05))
    return paths
