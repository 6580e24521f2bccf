"""Tasks: loading, prompt construction and output parsing, one module per task."""

from __future__ import annotations

import importlib

from newsray.config import Config
from newsray.errors import ConfigError
from newsray.tasks.base import Example, Metric, Splits, Task

#: every task by name: its module and class (imported when first asked for)
TASKS: dict[str, tuple[str, str]] = {"news": ("newsray.tasks.news", "NewsTask"), "agnews": ("newsray.tasks.agnews", "AgNewsTask")}


def task_type(name: str) -> type[Task]:
    """The Task class named `name` (its data-free facts: parse rule, grammar, metrics, Serve kind)."""
    if name not in TASKS:
        raise ConfigError(f"data.task: unknown task {name!r} (known: {', '.join(TASKS)}).")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)


def get_task(cfg: Config) -> Task:
    """The task object named by `cfg.data.task`."""
    return task_type(cfg.data.task)(cfg.data)


def serve_task(kind: str) -> str:
    """The name of the task that the Serve endpoint kind `kind` (analyze, classify) answers."""
    return next(name for name in TASKS if task_type(name).serve_kind == kind)


def data_report(cfg: Config, track: bool = False) -> dict:
    """Validate the task's data and describe it; with `track`, record it as an MLflow run."""
    task = get_task(cfg)
    stats = task.stats(task.load())
    if track:
        import mlflow

        from newsray import tracking

        with tracking.start_run(cfg, run_name=f"data-{task.name}", stage="data", data_hashes=task.data_hashes()) as run:
            mlflow.log_metrics({f"n_{k}": v["n"] for k, v in stats["splits"].items()} | {"n_leaks": len(stats["leakage"])})
            mlflow.log_dict(stats, "data_stats.json")
            stats["mlflow_run_id"] = run.info.run_id
    return stats


__all__ = ["TASKS", "Example", "Metric", "Splits", "Task", "data_report", "get_task", "serve_task", "task_type"]
