"""`newsray tune`: a Ray Tune search over Ray Train runs, tracked in MLflow; the best adapter is registered.

`tune(cfg, resume=False)` is the one entry point (CLI, jobs/tune.py, the pipeline, tests). Every
check that needs no trial runs first (newsray.search). The search lives in
`<train.storage_path>/<tune.name>` (Tune's state, one Ray Train run per trial under train_runs/,
and newsray_tune.json: the config, the MLflow parent run, the status); `resume=True` continues an
interrupted search with `Tuner.restore` (finished and failed trials are not run again). MLflow: one
parent run (stage tune) with a nested child run per trial; the trial table is printed with rich and
saved as trials.csv / trials.md (locally under <tracking.run_dir>/tune/<name>, and as artefacts).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from newsray.config import Config
from newsray.console import progress, progress_enabled, warn
from newsray.errors import ConfigError, NewsrayError
from newsray.registry import Registration, objective_basis, register
from newsray.search import (
    FAIL_ENV,
    check_resources,
    check_search_space,
    expected_trials,
    lora_alpha,
    objective_of,
    param_space,
    reaping_orphaned_placement_groups,
    run_trial,
    scheduler,
    searcher,
    trial_config,
    trial_dirname,
)

SEARCH_FILE = "newsray_tune.json"
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "early_stopped": "KILLED", "interrupted": "KILLED"}


class SearchInterrupted(NewsrayError):
    """The search stopped before every trial ended; `newsray tune --resume` continues it."""


class SearchFailed(NewsrayError):
    """No trial of the search completed."""


@dataclass
class TuneResult:
    """What a search found and where it is recorded."""

    name: str  # the search: a directory under train.storage_path
    experiment_path: Path
    mlflow_run_id: str  # the parent run
    objective: str
    mode: str
    best_trial_id: str
    best_params: dict[str, Any]
    best_value: float
    adapter_dir: Path
    adapter_uri: str  # runs:/<best trial's child run>/adapter
    best_run_id: str
    table_path: Path  # trials.md (trials.csv beside it)
    trials: list[dict[str, Any]] = field(default_factory=list)
    registration: Registration | None = None


def prepare(cfg: Config) -> Any:
    """Backend/hardware checks and the tokenized rows (once, shipped to every trial); then the data-aware checks."""
    from newsray.models import load_tokenizer
    from newsray.tasks import get_task
    from newsray.train.backends import get_backend
    from newsray.train.data import tokenize_examples
    from newsray.train.optim import check_precision_and_optimizer

    check_search_space(cfg)
    probe = trial_config(cfg, {"learning_rate": cfg.tune.learning_rate[0], "lora_r": cfg.tune.lora_r[0],
                               "batch_size": max(cfg.tune.batch_size)}, cfg.train.storage_path, "probe")
    get_backend(probe.train.backend).preflight(probe)
    check_precision_and_optimizer(probe)
    data = tokenize_examples(probe, get_task(probe), load_tokenizer(probe.model))
    check_search_space(cfg, len(data.train), data.source)
    if not data.val:
        raise ConfigError(f"tune: the validation split of {data.source} is empty after dropping examples longer than "
                          f"model.max_seq_length={cfg.model.max_seq_length}; raise data.val_fraction or model.max_seq_length.")
    return data


def _storage(cfg: Config) -> Path:
    if "://" in cfg.train.storage_path and not cfg.train.storage_path.startswith("file://"):
        raise ConfigError(f"train.storage_path={cfg.train.storage_path}: tune keeps its search state on a local or shared filesystem path; use one.")
    return Path(cfg.train.storage_path.removeprefix("file://"))


def _read_state(path: Path) -> dict[str, Any]:
    """A search's state file (ConfigError naming it if it is unreadable: the search cannot be resumed from it)."""
    file = path / SEARCH_FILE
    try:
        state = json.loads(file.read_text())
        if isinstance(state, dict) and isinstance(state.get("name"), str):
            return state
        problem = "it is not a newsray search state (no name)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"{type(e).__name__}: {str(e)[:120]}"
    raise ConfigError(f"{file} cannot be read ({problem}); the search in {path} cannot be resumed: start a new search "
                      "(another tune.name), or restore the file.")


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path / f".{SEARCH_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path / SEARCH_FILE)


def find_search(cfg: Config) -> Path:
    """The search to resume: tune.name, else the newest unfinished search of this task under train.storage_path."""
    storage = _storage(cfg)
    if cfg.tune.name:
        path = storage / cfg.tune.name
        if not (path / SEARCH_FILE).is_file():
            raise ConfigError(f"tune.name={cfg.tune.name}: there is no search to resume in {path}; start it without --resume.")
        if _read_state(path).get("status") == "finished":
            raise ConfigError(f"search {cfg.tune.name} already finished (see {path / SEARCH_FILE}); start a new search without --resume.")
        return path
    found = []
    for p in storage.glob(f"*/{SEARCH_FILE}"):
        try:
            state = _read_state(p.parent)
        except ConfigError as e:  # one unreadable search does not hide the others
            warn(f"skipped: {e}")
            continue
        if state.get("status") != "finished" and state.get("task") == cfg.data.task:
            found.append(p.parent)
    if not found:
        raise ConfigError(f"--resume: no unfinished {cfg.data.task} search under {storage}; start one without --resume (or name it with tune.name=NAME).")
    return max(found, key=lambda p: (p / SEARCH_FILE).stat().st_mtime)


def tune(cfg: Config, resume: bool = False, prepared: Any = None) -> TuneResult:
    """Search lr / LoRA rank / batch size with Ray Tune over Ray Train; register the best adapter.

    prepared: what `prepare(cfg)` returned, when the caller ran the checks already (the pipeline does,
    before it opens its MLflow run); a resumed search prepares its own saved config."""
    import mlflow
    import ray

    from newsray import tracking
    from newsray.raycluster import init_ray, preflight_placement

    storage = _storage(cfg)
    if resume:
        path = find_search(cfg)
        state = _read_state(path)
        base = Config.model_validate(state["config"])
        base.ray = cfg.ray.model_copy()
    else:
        base = cfg.model_copy(deep=True)
        name = cfg.tune.name or f"tune-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        path = storage / name
        if path.exists():
            raise ConfigError(f"tune.name={name}: {path} already exists; continue it with --resume or choose another name.")
        state = {"name": name, "task": cfg.data.task, "status": "new"}
    name = state["name"]
    objective, mode = objective_of(base)
    data = prepared if prepared is not None and not resume else prepare(base)
    base.tracking.uri = tracking.check_store(base)  # absolute, for the trial actors; a server must answer before Ray starts
    init_ray(base)
    check_resources(base, ray.cluster_resources().get("CPU", 0.0), in_process=not (base.ray.address or os.environ.get("RAY_ADDRESS")))
    preflight_placement(base, "tune")
    exp_id = tracking.setup(base)
    out_dir = Path(base.tracking.run_dir).resolve() / "tune" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    parent_id = state.get("parent_run_id", "")
    try:
        with contextlib.ExitStack() as stack:
            if resume:
                parent = stack.enter_context(mlflow.start_run(run_id=parent_id, nested=mlflow.active_run() is not None))
                mlflow.set_tag("newsray.resumed", str(int(parent.data.tags.get("newsray.resumed", "0")) + 1))
            else:
                parent = stack.enter_context(tracking.start_run(base, run_name=name, stage="tune", data_hashes=data.data_hashes))
                parent_id = parent.info.run_id
                path.mkdir(parents=True)
                state |= {"parent_run_id": parent_id, "experiment_id": exp_id, "config": base.model_dump(mode="json"),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                mlflow.set_tags({"newsray.tune.name": name, "newsray.tune.path": str(path), "newsray.tune.objective": objective,
                                 "newsray.tune.mode": mode, "newsray.tune.search_alg": base.tune.search_alg,
                                 "newsray.tune.scheduler": "ASHA(val_loss)"})
            _write_state(path, state | {"status": "running"})
            spec = {"cfg": base.model_dump(mode="json"), "name": name, "train_storage": str(path / "train_runs"),
                    "tracking_uri": base.tracking.uri, "experiment_id": exp_id, "parent_run_id": parent_id,
                    "eval_dir": str(out_dir / "val_eval"), "fail": os.environ.get(FAIL_ENV)}
            return _search(base, data, spec, path, out_dir, state, resume)
    except SearchInterrupted:
        mlflow.MlflowClient(base.tracking.uri).set_terminated(parent_id, "KILLED")  # after the run's own end (FAILED)
        raise


def _search(base: Config, data: Any, spec: dict[str, Any], path: Path, out_dir: Path, state: dict[str, Any], resume: bool) -> TuneResult:
    """Run (or restore) the Tuner inside the parent run, then table, best trial, registry."""
    import mlflow
    from ray import tune as rt

    name, run_id, started = spec["name"], spec["parent_run_id"], time.perf_counter()
    objective, mode = objective_of(base)
    trainable = rt.with_resources(rt.with_parameters(run_trial, spec=spec, data=data), {"CPU": base.tune.driver_cpus})
    # val_loss comes every asha_grace_period steps and the objective only at the end; the steps in
    # between report loss alone. ASHA and the searchers skip results without their metric; Tune's
    # strict check would reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    feed = contextlib.nullcontext([]) if resume else TrialProgress(expected_trials(base))  # Tuner.restore takes no callbacks
    if resume:
        if not rt.Tuner.can_restore(str(path)):
            raise ConfigError(f"search {name}: {path} holds no Tune state to restore (it stopped before the first save); start a new search.")
        tuner = rt.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        t = base.tune
        tuner = rt.Tuner(trainable, param_space=param_space(base), tune_config=rt.TuneConfig(
            search_alg=searcher(base, objective, mode), scheduler=scheduler(base), max_concurrent_trials=t.max_concurrent_trials,
            num_samples=1 if t.search_alg == "grid" else t.num_samples, trial_dirname_creator=trial_dirname),
            run_config=rt.RunConfig(name=name, storage_path=str(path.parent), failure_config=rt.FailureConfig(max_failures=0),
                                    callbacks=feed.callbacks))
    with reaping_orphaned_placement_groups(), feed:
        tuner.fit()
    rows = trial_rows(path, base, objective, run_id)
    _reconcile(base.tracking.uri or "", rows)
    table_path = write_table(rows, out_dir, objective)
    for f in ("trials.csv", "trials.md"):
        mlflow.log_artifact(str(out_dir / f), artifact_path="tune")
    print_table(rows, f"search {name}: {objective} ({'lower' if mode == 'min' else 'higher'} is better)", objective)
    counts = {s: sum(r["status"] == s for r in rows) for s in MLFLOW_STATUS}
    mlflow.log_metrics({f"n_{s}": n for s, n in counts.items()} | {"n_trials": len(rows), "wall_s": time.perf_counter() - started})
    if counts["interrupted"] or len(rows) < expected_trials(base):
        _write_state(path, state | {"status": "interrupted"})
        unfinished = counts["interrupted"] + expected_trials(base) - len(rows)
        raise SearchInterrupted(f"search {name} stopped with {unfinished} of {expected_trials(base)} trials unfinished; continue it with "
                                f"`newsray tune --resume tune.name={name}` (same storage and tracking settings).")
    done = [r for r in rows if r["status"] == "completed" and r["objective"] is not None and math.isfinite(r["objective"])]
    if not done:
        _write_state(path, state | {"status": "finished"})
        raise SearchFailed(f"search {name}: no trial completed ({counts['failed']} failed, {counts['early_stopped']} stopped early); "
                           f"see {table_path} and the trials' MLflow runs.")
    best = (min if mode == "min" else max)(done, key=lambda r: r["objective"])
    result = TuneResult(name, path, run_id, objective, mode, best["trial_id"], best["params"], float(best["objective"]),
                        Path(best["adapter_dir"]), f"runs:/{best['mlflow_run_id']}/adapter", best["mlflow_run_id"], table_path, rows)
    mlflow.log_metric(f"best_{objective}", result.best_value)
    mlflow.set_tags({"newsray.best_trial": result.best_trial_id, "newsray.best_run_id": result.best_run_id,
                     "newsray.best_adapter_uri": result.adapter_uri})
    if base.tune.register_best:
        result.registration = register(base, result.adapter_uri, result.best_run_id, objective, result.best_value,
                                       objective_basis(base, data.data_hashes), source=f"tune search {name}, trial {best['trial_id']}")
        mlflow.set_tags({"newsray.registered_version": result.registration.version,
                         "newsray.champion_moved": str(result.registration.champion_moved).lower()})
    _write_state(path, state | {"status": "finished", "best_trial": result.best_trial_id, "best_value": result.best_value,
                                "adapter_uri": result.adapter_uri})
    return result


def trial_rows(path: Path, cfg: Config, objective: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per trial: its values, status (completed/early_stopped/failed/interrupted), numbers and MLflow run.

    Read from the experiment state Tune saved on disk: after an interruption Tune marks its live
    trials TERMINATED in memory, but the saved state keeps them RUNNING/PENDING, as restore sees them.
    """
    from mlflow import MlflowClient
    from ray.tune import ExperimentAnalysis

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    children = {r.data.tags.get("newsray.trial_id"): r for r in client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000)}
    rows = []
    for trial in sorted(ExperimentAnalysis(str(path)).trials, key=lambda t: t.trial_id):
        last, p = trial.last_result or {}, trial.config
        status = ("completed" if last.get("trial_completed") else
                  {"ERROR": "failed", "TERMINATED": "early_stopped"}.get(trial.status, "interrupted"))
        child = children.get(trial.trial_id)
        val_loss = trial.metric_analysis.get("val_loss", {}).get("last")
        obj = last.get(objective) if status == "completed" else (val_loss if objective == "val_loss" else None)
        params = {k: p[k] for k in ("learning_rate", "lora_r", "batch_size", "warmup_steps") if k in p}
        rows.append({"trial_id": trial.trial_id, "status": status, "params": params,
                     "learning_rate": p.get("learning_rate"), "lora_r": p.get("lora_r"),
                     "lora_alpha": lora_alpha(cfg, int(p["lora_r"])) if "lora_r" in p else None,
                     "batch_size": p.get("batch_size"), "warmup_steps": p.get("warmup_steps", cfg.train.warmup_steps),
                     "steps": last.get("step"), "val_loss": val_loss, "objective": obj,
                     "mlflow_run_id": child.info.run_id if child else None, "adapter_dir": last.get("adapter_dir"),
                     "error": (child.data.tags.get("newsray.error") if child else None) or (str(trial.status) if status == "failed" else None)})
    return rows


def _reconcile(tracking_uri: str, rows: list[dict[str, Any]]) -> None:
    """Child runs of trials that ASHA stopped or an interruption cut off are still RUNNING: close them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for r in rows:
        if r["mlflow_run_id"] and client.get_run(r["mlflow_run_id"]).info.status == "RUNNING":
            client.set_tag(r["mlflow_run_id"], "newsray.trial_status", r["status"])
            client.set_terminated(r["mlflow_run_id"], MLFLOW_STATUS[r["status"]])


COLUMNS = ("trial_id", "status", "learning_rate", "lora_r", "lora_alpha", "batch_size", "warmup_steps", "steps", "val_loss", "objective", "mlflow_run_id")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.4f}"
    return "" if v is None else str(v)


def write_table(rows: list[dict[str, Any]], out_dir: Path, objective: str) -> Path:
    """trials.csv and trials.md in out_dir (with each failed trial's error); returns the Markdown path."""
    cols = (*COLUMNS, "error")
    header = [c if c != "objective" else f"objective ({objective})" for c in cols]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([[r.get(c) for c in cols] for r in rows])
    (out_dir / "trials.csv").write_text(buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |" for r in rows]
    (out_dir / "trials.md").write_text("\n".join(md) + "\n")
    return out_dir / "trials.md"


class TrialProgress:
    """On a terminal, a bar of the search's finished trials (a Tune callback in this driver feeds it), noting the latest step."""

    def __init__(self, total: int) -> None:
        self.total, self.callbacks, self._bar = total, [], None
        if progress_enabled():
            from ray.tune import Callback

            outer = self

            class TrialFeed(Callback):
                def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                    outer._advance(0, f"trial {trial.trial_id}: step {result.get('step', result.get('training_iteration'))}")

                def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                    outer._advance(1, f"trial {trial.trial_id} done")

                def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                    outer._advance(1, f"trial {trial.trial_id} failed")

            self.callbacks = [TrialFeed()]

    def _advance(self, n: int, note: str) -> None:
        if self._bar is not None:
            self._bar[1](n, note=note)

    def __enter__(self) -> Self:
        if self.callbacks:
            cm = progress("tune", self.total, "trials")
            self._bar = (cm, cm.__enter__())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar[0].__exit__(*exc)
            self._bar = None


def print_table(rows: list[dict[str, Any]], title: str, objective: str) -> None:
    """The trial table on the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    short = {"trial_id": "trial", "learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "batch_size": "batch",
             "warmup_steps": "warmup", "objective": f"objective ({objective})", "mlflow_run_id": "MLflow run"}
    table = Table(*[short.get(c, c) for c in COLUMNS], title=title)
    style = {"completed": "green", "failed": "red", "early_stopped": "yellow", "interrupted": "magenta"}
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in COLUMNS], style=style.get(r["status"]))
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = max(console.width, 150)  # logs and CI: the whole table, not 80 columns of ellipses
    console.print(table)
