"""The `newsray` command line: parse, load the config, call a stage, print. No stage logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from newsray.errors import NewsrayError

app = typer.Typer(help="newsray: LoRA fine-tuning, search, evaluation and serving on Ray, for news analysis.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Validate and describe the task data.", no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)
config_app = typer.Typer(help="The typed configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="A recipe from configs/ (default: built-in defaults = news + embedded SmolLM2 on CPU).")
OverridesArg = typer.Argument(None, help="section.key=value overrides, e.g. train.learning_rate=1e-4.")


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from newsray.config import load_config

    return load_config(config, overrides or [])


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                fields: bool = typer.Option(False, "--fields", help="Print every field with its type, default and meaning.")) -> None:
    """Print the resolved config (after interpolation and overrides) as YAML."""
    if fields:
        from newsray.config import describe_fields

        table = Table("field", "type", "default", "meaning")
        for row in describe_fields():
            table.add_row(*row)
        out.print(table)
        return
    out.print(_load(config, overrides).to_yaml(), end="", markup=False, highlight=False)


@data_app.command("validate")
def data_validate(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                  all_errors: bool = typer.Option(False, "--all", help="List every bad line instead of stopping at the first.")) -> None:
    """Check every record of the task's data files; bad lines are reported as file:line: reason."""
    from newsray.tasks import get_task

    task = get_task(_load(config, overrides))
    errors = task.validate(all_errors=all_errors)
    for e in errors:
        err.print(e, markup=False, highlight=False)
    if errors:
        err.print(f"[red]{len(errors)} bad record(s)[/red]")
        raise typer.Exit(1)
    splits = task.load()
    for leak in task.stats(splits)["leakage"]:
        err.print(f"[yellow]leakage:[/yellow] {escape(leak)}", highlight=False)
    files = ", ".join(str(p) for p in task.files().values())
    out.print(f"[green]ok[/green] {task.name}: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test ({escape(files)})", highlight=False)


@data_app.command("stats")
def data_stats(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
               track: bool = typer.Option(False, "--track", help="Also record the statistics as an MLflow run.")) -> None:
    """Split sizes, date ranges, label distributions and train/test leakage."""
    from newsray.tasks import get_task

    cfg = _load(config, overrides)
    task = get_task(cfg)
    stats = task.stats(task.load())
    if track:
        from newsray import tracking

        with tracking.start_run(cfg, run_name=f"data-{task.name}", stage="data", data_hashes=task.data_hashes()) as run:
            import mlflow

            mlflow.log_metrics({f"n_{k}": v["n"] for k, v in stats["splits"].items()} | {"n_leaks": len(stats["leakage"])})
            mlflow.log_dict(stats, "data_stats.json")
            stats["mlflow_run_id"] = run.info.run_id
    if as_json:
        out.print_json(json.dumps(stats))
        return
    table = Table(title=f"{task.name} data")
    table.add_column("")
    for name in stats["splits"]:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for s in stats["splits"].values() for k in s))
    for k in keys:
        table.add_row(k, *[_fmt(s.get(k)) for s in stats["splits"].values()])
    out.print(table)
    out.print(f"leakage (same id/title in train and test): {len(stats['leakage'])}", highlight=False)
    for leak in stats["leakage"]:
        out.print(f"  {leak}", markup=False, highlight=False)
    if "mlflow_run_id" in stats:
        out.print(f"MLflow run: {stats['mlflow_run_id']}", highlight=False)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, dict):
        return " ".join(f"{k}:{n}" for k, n in v.items())
    if isinstance(v, list):
        return "–".join(map(str, v))
    return "" if v is None else str(v)


@model_app.command("prepare")
def model_prepare(name: Optional[str] = typer.Argument(None, help="Registry name, hub id or local dir (default: the config's model.name)."),
                  config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Make a base model loadable offline (converts the embedded SmolLM2 once into the cache)."""
    from newsray.models import prepare_model

    resolved = prepare_model(name or _load(config, overrides).model.name, progress=lambda m: err.print(m, highlight=False))
    out.print(f"[green]ready[/green] {escape(resolved.name)} ({resolved.kind}): {escape(resolved.source)}", highlight=False)


@app.command("score")
def score(predictions: Path = typer.Argument(..., help="Predictions JSON: a list of records (relevance_score, summary, key_insights, company_names, is_valid_json)."),
          references: Path = typer.Argument(..., help="References JSON, paired with the predictions by position."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Score news predictions against references with the published metric suite (docs/METRICS.md)."""
    from newsray.evaluate.scoring import score_files

    aggregates = score_files(predictions, references)
    if as_json:
        out.print_json(json.dumps(aggregates))
        return
    table = Table("metric", "value", title=f"{predictions.name} vs {references.name}")
    for k, v in aggregates.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, without a traceback."""
    try:
        app()
    except NewsrayError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
