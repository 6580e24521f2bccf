"""User-facing errors: one clear sentence, printed by the CLI without a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class NewsrayError(Exception):
    """An error the user can fix (bad config, bad data line, missing data or model)."""


class ConfigError(NewsrayError):
    """The configuration is invalid; the message names the file and the YAML path."""


class DataError(NewsrayError):
    """A data file is missing or malformed; the message names file:line and the field."""


class ModelError(NewsrayError):
    """A model cannot be resolved or prepared."""


class GenerationError(NewsrayError):
    """Constrained decoding cannot go on: a row left its grammar, or the grammar cannot be built for the tokenizer."""


def cause(exc: BaseException, cls: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of type `cls` in `exc` or anything Ray wrapped in it (causes, worker and controller failures)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):
            inner = getattr(e, "cause", None)  # Ray's RayTaskError(X) is an X whose message is Ray's; .cause is the X raised
            return inner if isinstance(inner, cls) else e
        todo += [getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__, e.__context__,
                 *getattr(e, "worker_failures", {}).values()]
    return None


def user_error(exc: BaseException) -> NewsrayError | None:
    """A NewsrayError raised in a Ray worker, actor or task, dug out of Ray's wrappers (None if there is none)."""
    return cause(exc, NewsrayError)  # type: ignore[return-value]


@contextlib.contextmanager
def ray_user_errors() -> Iterator[None]:
    """Inside: an exception from Ray that holds a NewsrayError (raised in an actor or a task) becomes that error."""
    try:
        yield
    except Exception as exc:
        user = user_error(exc)
        if user is None or user is exc:
            raise
        raise user from None
