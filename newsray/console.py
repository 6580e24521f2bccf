"""What a person sees on the terminal: the CLI's two consoles, progress bars, and the log file that takes the rest.

A stage command (train, tune, evaluate, analyze, compare, export, serve, pipeline) prints its own
lines and bars on `out`/`err`; everything else written to this process's stdout and stderr - Ray's,
MLflow's and transformers' log records and warnings, the worker logs Ray forwards to the driver,
Tune's status tables, C libraries and child processes such as an in-process Ray's raylet - goes to
`<tracking.run_dir>/logs/<command>-<time>.log` (`capture_logs`, called by the CLI only when newsray
runs as its own process). `--verbose` leaves both streams as they are. The capture is at the file-descriptor level (os.dup2), so nothing that writes to fd 1 or 2
can slip past it; the consoles write to duplicates of the original descriptors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

_capture: dict[str, Any] = {}  # path, the saved descriptors, the newsray log handler


def log_path() -> Path | None:
    """The log file this process writes Ray's, MLflow's and the libraries' output to (None: not captured)."""
    return _capture.get("path")


def capture_logs(run_dir: str | Path, command: str) -> Path:
    """From now on fds 1 and 2 write to a new log file under `run_dir`/logs; `out` and `err` keep the terminal.

    newsray's own warnings (`warn`, and the `newsray` logger's records) still reach the terminal. Idempotent.
    """
    if "path" in _capture:
        return _capture["path"]
    logs = Path(run_dir).expanduser().resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out.file = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    err.file = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = _TerminalWarnings()
    logging.getLogger("newsray").addHandler(handler)
    _capture.update(path=path, saved=saved, handler=handler)
    print(f"newsray {command}: log of Ray, MLflow and the libraries (pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
    return path


def release_logs() -> None:
    """Give fds 1 and 2 back to the terminal (at exit, or before handing the terminal to a child)."""
    if "saved" not in _capture:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, saved in zip((1, 2), _capture.pop("saved")):
        os.dup2(saved, fd)
        os.close(saved)
    logging.getLogger("newsray").removeHandler(_capture.pop("handler"))


def warn(msg: str) -> None:
    """One of newsray's own warnings: a yellow `warning:` line on the terminal, captured or not."""
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False)


class _TerminalWarnings(logging.Handler):
    """The `newsray` logger's WARNING+ records on the terminal while the rest is captured."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            warn(record.getMessage())
        except Exception:  # noqa: BLE001 - a warning must never break the command
            self.handleError(record)


@contextmanager
def progress(label: str, total: int | None, unit: str) -> Iterator[Callable[..., None]]:
    """A rich bar `label ━━━ done/total unit, rate, ETA` on `out` while the block runs; yields advance(n=1, note='').

    `note` (e.g. the latest loss) is shown after the bar. Off a terminal it draws nothing (a log or CI
    gets the stage's result lines instead). Usable from any thread.
    """
    if not out.is_terminal:
        yield lambda n=1, note="": None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                   console=out, transient=False, **_redirect())
    task = bar.add_task(label, total=total, rate="", note="")
    t0, done = time.perf_counter(), 0

    def advance(n: int = 1, note: str = "") -> None:
        nonlocal done
        done += n
        rate = done / max(time.perf_counter() - t0, 1e-9)
        bar.update(task, advance=n, note=note, rate=f"{rate:.2f} {unit}/s" if rate >= 0.1 else f"{60 * rate:.1f} {unit}/min")

    with bar:
        yield advance


@contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner with `text` on `out` while the block runs (rich's Console.status, without its stdout redirect)."""
    from rich.live import Live
    from rich.spinner import Spinner

    with Live(Spinner("dots", text), console=out, transient=True, refresh_per_second=8, **_redirect()):
        yield


def _redirect() -> dict[str, bool]:
    """rich's live displays (bars, spinners) replace sys.stdout/sys.stderr by default and print what the
    libraries write above the display: right when the logs are on the console (--verbose), wrong while
    they are captured (they would reach the terminal)."""
    captured = "saved" in _capture
    return {"redirect_stdout": not captured, "redirect_stderr": not captured}


def progress_enabled() -> bool:
    """Whether bars are drawn (a terminal): callers skip the work of feeding them otherwise."""
    return out.is_terminal
