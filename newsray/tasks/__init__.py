"""Tasks: loading, prompt construction and output parsing, one module per task."""

from __future__ import annotations

from newsray.config import Config
from newsray.errors import ConfigError
from newsray.tasks.base import Example, Splits, Task


def get_task(cfg: Config) -> Task:
    """The task object named by `cfg.data.task`."""
    name = cfg.data.task
    if name == "news":
        from newsray.tasks.news import NewsTask

        return NewsTask(cfg.data)
    if name == "agnews":
        from newsray.tasks.agnews import AgNewsTask

        return AgNewsTask(cfg.data)
    raise ConfigError(f"data.task: unknown task {name!r} (known: news, agnews).")


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


__all__ = ["Example", "Splits", "Task", "data_report", "get_task"]
