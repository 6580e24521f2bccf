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


__all__ = ["Example", "Splits", "Task", "get_task"]
