"""The `newsray` command line: parse, load the config, call a stage, print. No stage logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from newsray.console import err, out
from newsray.errors import NewsrayError

app = typer.Typer(help="newsray: LoRA fine-tuning, search, evaluation and serving on Ray, for news analysis.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Validate and describe the task data.", no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)
config_app = typer.Typer(help="The typed configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

_state = {"verbose": False, "capture": False}  # capture: set by main(), the console entry point (never in-process callers)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's, MLflow's and the libraries' log records on the "
                                          "console instead of writing them to <tracking.run_dir>/logs/<command>-<time>.log.")) -> None:
    _state["verbose"] = verbose

ConfigOpt = typer.Option(None, "--config", "-c", help="A recipe from configs/ (default: built-in defaults = news + embedded SmolLM2 on CPU).")
OverridesArg = typer.Argument(None, help="section.key=value overrides, e.g. train.learning_rate=1e-4.")


def _load(config: Optional[Path], overrides: Optional[list[str]], command: str | None = None):
    """The resolved config; for a stage command (`command`) run as a command (main) the console then goes quiet (newsray.console)."""
    from newsray.config import load_config

    cfg = load_config(config, overrides or [])
    if command and _state["capture"] and not _state["verbose"]:
        from newsray.console import capture_logs, log_path

        if log_path() is None:
            path = capture_logs(cfg.tracking.run_dir, command)
            out.print(f"[dim]logs: {escape(str(path))} (--verbose shows them here)[/dim]", highlight=False)
    return cfg


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
    from newsray.tasks import data_report

    stats = data_report(_load(config, overrides), track=track)
    if as_json:
        out.print_json(json.dumps(stats))
        return
    table = Table(title=f"{stats['task']} data")
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
        return " to ".join(map(str, v))
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


@app.command("train")
def train_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Fine-tune a LoRA adapter with Ray Train (docs/TRAINING.md); prints the adapter dir, URI and MLflow run."""
    from newsray.train import train

    result = train(_load(config, overrides, "train"))
    out.print(f"adapter dir: {result.adapter_dir}\nadapter uri: {result.adapter_uri}\nmlflow run: {result.mlflow_run_id}\n"
              f"ray run: {result.run_name}", markup=False, highlight=False)


@app.command("compare")
def compare_cmd(sources: list[str] = typer.Argument(..., help="Two or more MLflow evaluation run ids (or runs:/ID) or evaluation directories."),
                name: Optional[list[str]] = typer.Option(None, "--name", "-n", help="Display name per source, in order (default: run or directory name)."),
                config: Optional[Path] = ConfigOpt, out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: <tracking.run_dir>/compare/<time>)."),
                overrides: Optional[list[str]] = typer.Option(None, "--set", help="section.key=value override, e.g. eval.bootstrap_seed=7 (repeatable)."),
                references: Optional[Path] = typer.Option(None, "--references", help="News references JSON, for sources that are predictions files.")) -> None:
    """Compare evaluations: metric table, paired tests, plots and a Markdown report, logged to MLflow (docs/REPORTS.md)."""
    from newsray.evaluate.report import compare

    result = compare(_load(config, overrides, "compare"), list(sources), list(name) if name else None, out_dir, references)
    out.print(f"[green]compared[/green] {escape(', '.join(result.names))} ({result.task}): {escape(str(result.report))}", highlight=False)
    out.print(f"plots: {len(result.plots)} in {escape(str(result.report.parent / 'plots'))}; MLflow run: {result.mlflow_run_id}", highlight=False)


@app.command("submit")
def submit_cmd(stage: str = typer.Argument(..., help="A stage with a job entrypoint in jobs/ (data, train, evaluate, ...)."),
               config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
               address: Optional[str] = typer.Option(None, "--address", help="Ray Jobs API (dashboard) URL; default $RAY_ADDRESS, else http://127.0.0.1:8265."),
               wait: bool = typer.Option(True, "--wait/--no-wait", help="Stream the logs until the job ends."),
               model: Optional[str] = typer.Option(None, "--model", "-m", help="For evaluate/serve jobs: baseline, an adapter dir or an MLflow URI.")) -> None:
    """Submit a stage as a Ray job (Jobs SDK), stream its logs, print its status and result."""
    from newsray.submit import submit

    res = submit(stage, config, overrides or [], address=address, wait=wait, job_args=["--model", model] if model else [])
    out.print(f"job {res.job_id}: {res.status}", highlight=False)
    if res.result is not None:
        out.print_json(json.dumps(res.result, default=str))
    if wait and res.status != "SUCCEEDED":
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                 model: str = typer.Option("baseline", "--model", "-m", help="baseline, a PEFT adapter directory, or an MLflow URI (runs:/ID/PATH, models:/NAME@ALIAS, models:/NAME/VERSION)."),
                 out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: <tracking.run_dir>/eval/<time>-<task>-<model>[-constrained]).")) -> None:
    """Generate, parse and score the task's test set on Ray Data; write the files and one MLflow run (docs/EVALUATION.md)."""
    from newsray.evaluate.pipeline import evaluate
    from newsray.tasks import task_type

    cfg = _load(config, overrides, "evaluate")
    res = evaluate(cfg, model, out_dir)
    table = Table("metric", "value", title=f"evaluate {model}")
    for k in task_type(cfg.data.task).summary_keys():
        if k in res.aggregates:
            v = res.aggregates[k]
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    out.print(f"files: {escape(str(res.out_dir))}", highlight=False)
    out.print(f"MLflow run: {res.run_id}", highlight=False)


@app.command("analyze")
def analyze_cmd(input_uri: str = typer.Argument(..., metavar="INPUT", help="JSONL, CSV or Parquet of items with the task's input fields (a path or s3://, gs://, ... URI)."),
                config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                model: str = typer.Option("baseline", "--model", "-m", help="baseline, a PEFT adapter directory, or an MLflow URI (models:/NAME@ALIAS is pinned to its version)."),
                out_path: str = typer.Option(..., "--out", help="OUT.jsonl (JSON lines) or a directory of Parquet parts; a re-run with the same OUT does only the missing items.")) -> None:
    """Run a model over new items on Ray Data (the evaluation's generation path); restartable (docs/ANALYZE.md)."""
    from newsray.analyze import analyze

    res = analyze(_load(config, overrides, "analyze"), input_uri, model, out_path)
    out.print(f"analyzed {res.rows_written} item(s) with {escape(res.model_ref)} in {res.wall_s:.0f} s "
              f"({res.rows_skipped} already in the output, {res.rows_failed} with an error): {escape(res.out)}", highlight=False)


@app.command("serve")
def serve_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
              model: str = typer.Option("baseline", "--model", "-m", help="baseline, a PEFT adapter directory, or an MLflow URI (runs:/ID/PATH, models:/NAME@ALIAS)."),
              detach: bool = typer.Option(False, "--detach", help="On a cluster (ray.address / $RAY_ADDRESS): deploy and return, leaving the app running.")) -> None:
    """Serve the model over HTTP with Ray Serve until Ctrl-C (docs/SERVING.md)."""
    from newsray.serving import run

    cfg = _load(config, overrides, "serve")
    url = run(cfg, model, blocking=not detach, on_ready=lambda u: out.print(f"serving {model} at {u} (Ctrl-C to stop)", markup=False, highlight=False), detach=detach)
    out.print(f"{'deployed' if detach else 'stopped'}: {url}", markup=False, highlight=False)


@app.command("tune")
def tune_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
             resume: bool = typer.Option(False, "--resume", help="Continue tune.name (or the newest unfinished search) without repeating finished trials.")) -> None:
    """Search learning rate, LoRA rank and batch size with Ray Tune over Ray Train; register the best adapter (docs/TUNING.md)."""
    from newsray.tune import tune

    r = tune(_load(config, overrides, "tune"), resume=resume)
    out.print(f"best trial: {r.best_trial_id} {json.dumps(r.best_params)}\n{r.objective}: {r.best_value:.4f}\nadapter uri: {r.adapter_uri}\n"
              f"mlflow run: {r.mlflow_run_id}\nsearch: {r.name} ({r.experiment_path})\ntable: {r.table_path}", markup=False, highlight=False)
    if r.registration:
        g = r.registration
        out.print(f"registered: {g.uri}\nchampion: version {g.champion_version} ({'moved' if g.champion_moved else 'unchanged'}: {g.reason})", markup=False, highlight=False)


@app.command("export")
def export_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
               model: str = typer.Option(..., "--model", "-m", help="baseline, a PEFT adapter directory, or an MLflow URI (runs:/ID/PATH, models:/NAME@ALIAS, models:/NAME/VERSION)."),
               fmt: str = typer.Option(..., "--format", "-f", help="merged (HF safetensors dir), gguf (llama.cpp) or ollama (GGUF + Modelfile)."),
               out_dir: Path = typer.Option(..., "--out", help="A new or empty directory to write into."),
               quant: str = typer.Option("q8_0", "--quant", help="GGUF tensor type for gguf/ollama: f32, f16, bf16 or q8_0."),
               dtype: str = typer.Option("float32", "--dtype", help="Weight dtype of --format merged: float32, bfloat16 or float16."),
               log: bool = typer.Option(True, "--log/--no-log", help="Log the files to MLflow when --model is a runs:/ or models:/ URI.")) -> None:
    """Export a model for use outside newsray: merged HF weights, GGUF, or an Ollama Modelfile (docs/EXPORT.md)."""
    from newsray.export import export

    r = export(_load(config, overrides, "export"), model, fmt, out_dir, quant=quant, dtype=dtype, log=log,
               progress=lambda m: err.print(m, markup=False, highlight=False))
    out.print(f"[green]exported[/green] {escape(r.model_ref)} (base {escape(r.base_model)}) as {r.format}: {escape(str(r.out_dir))}", highlight=False)
    for f in r.files:
        out.print(f"  {f}", markup=False, highlight=False)
    if r.artifact_uri:
        out.print(f"MLflow: {r.artifact_uri}" + (f" (model version {r.model_version})" if r.model_version else ""), markup=False, highlight=False)


@app.command("pipeline")
def pipeline_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                 resume: bool = typer.Option(False, "--resume", help="Go on with the newest pipeline run that did not finish: "
                                             "the stages it finished are not run again (= pipeline.resume=true).")) -> None:
    """The end-to-end job: tune -> train -> evaluate baseline and tuned -> compare -> register -> serve one request (docs/PIPELINE.md)."""
    from newsray.pipeline import pipeline

    cfg = _load(config, [*(overrides or []), *(["pipeline.resume=true"] if resume else [])], "pipeline")
    r = pipeline(cfg)
    table = Table("what", "where", title=f"newsray pipeline: done in {r.wall_s / 60:.1f} min")
    rows = [("MLflow", f"{r.tracking_uri} (experiment {r.experiment}, pipeline run {r.mlflow_run_id})"), ("search run", r.tune_run_id),
            ("best values", json.dumps(r.best_params)), ("final training run", f"{r.train_run_id} ({r.adapter_uri})"),
            (f"final {r.objective} (val)", f"{r.objective_value:.4f}"), ("evaluation runs", f"baseline {r.baseline_run_id}, tuned {r.tuned_run_id}"),
            *[(f"test: {m}", "  ".join(f"{k}={v:.3f}" for k, v in vals.items())) for m, vals in r.headline.items()],
            ("report", str(r.report)), ("registered", r.registered), ("champion", f"{r.champion} ({'moved' if r.champion_moved else 'unchanged'}: {r.champion_reason})"),
            ("endpoint", f"{r.endpoint} ({'still serving' if r.endpoint and cfg.pipeline.keep_serving else 'stopped'})" if r.endpoint else "not started (pipeline.serve=false)")]
    for what, where in rows:
        table.add_row(what, escape(where))
    out.print(table)
    if r.answer:
        from newsray.pipeline import answer_caption

        out.print(f"[bold]the served answer[/bold] ({escape(answer_caption(cfg, r))}):", highlight=False)
        out.print_json(json.dumps(r.answer, default=str))


@app.command("tinker-server")
def tinker_server_cmd(port: int = typer.Option(..., "--port", help="TCP port (0 = a free one, printed on start)."),
                      host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback unless you mean it)."),
                      storage: Path = typer.Option(Path("runs/tinker-server"), "--storage", help="Directory for checkpoints (PEFT adapter directories)."),
                      model: Optional[list[str]] = typer.Option(None, "--model", help="A base model to offer: NAME (newsray registry name, hub id or local dir) or SERVED_NAME=NAME; repeatable (default: the embedded SmolLM2)."),
                      api_key_env: str = typer.Option("TINKER_API_KEY", "--api-key-env", help="Environment variable holding the API key clients must send (X-API-Key)."),
                      api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File holding the API key, read when the variable is unset or empty."),
                      no_auth: bool = typer.Option(False, "--no-auth", help="Accept any client (loopback experiments only)."),
                      cpus: float = typer.Option(1.0, "--cpus", help="CPUs of the worker actor (torch threads follow it)."),
                      gpus: float = typer.Option(0.0, "--gpus", help="GPUs of the worker actor (1 on a GPU node)."),
                      max_body_mb: int = typer.Option(64, "--max-body-mb", help="Largest accepted request body, in MiB (413 above)."),
                      ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to run the worker on (default $RAY_ADDRESS, else an in-process Ray).")) -> None:
    """Serve the Tinker API (the part the SDK uses for supervised LoRA training and sampling) backed by a Ray actor (docs/TRAINING.md)."""
    from newsray.tinker.cli import run_server

    run_server(port=port, host=host, storage=storage, models=model or [], api_key_env=api_key_env, api_key_file=api_key_file,
               no_auth=no_auth, cpus=cpus, gpus=gpus, max_body_mb=max_body_mb, ray_address=ray_address,
               on_ready=lambda url, names: out.print(f"newsray tinker-server: listening on {url} (models: {', '.join(names)})",
                                                     markup=False, highlight=False))


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, without a traceback.

    While the logs are captured, any other exception is one line too, naming the log file that holds
    its traceback (exit code 1); with --verbose it propagates as before.
    """
    from newsray.console import log_path, release_logs

    _state["capture"] = True  # a process of its own: its file descriptors are ours to redirect
    try:
        app()
    except NewsrayError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]" + (f" (logs: {escape(str(log_path()))})" if log_path() else ""))
        sys.exit(130)
    except Exception as e:
        if log_path() is None:
            raise
        import traceback

        traceback.print_exc()  # into the log file
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err.print(f"[red]error:[/red] {type(e).__name__}: {escape(first)} (the traceback and the logs are in {escape(str(log_path()))})",
                  highlight=False)
        sys.exit(1)
    finally:
        release_logs()


if __name__ == "__main__":
    main()
