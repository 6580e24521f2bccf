"""Scoring of prediction/reference JSON files, with one-sentence DataErrors for bad input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from newsray.errors import DataError
from newsray.evaluate.metrics import Record, aggregate_metrics
from newsray.tasks.news import REQUIRED_FIELDS

ID_FIELDS: tuple[str, ...] = ("id", "example_id")


def _field_error(path: Path, i: int, name: str, problem: str) -> DataError:
    """A DataError naming the file, the record and the field."""
    return DataError(f"{path}: record {i} {problem} field {name!r}.")


def _check_record(path: Path, i: int, rec: Any) -> Record:
    """Validate one raw record and normalise it (is_valid_json False needs no other field)."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{path}: record {i} is not a JSON object.")
    valid = rec.get("is_valid_json", True)
    if not isinstance(valid, bool):
        raise _field_error(path, i, "is_valid_json", "has a non-boolean")
    if not valid:
        return Record.from_dict(rec)
    for name in REQUIRED_FIELDS:
        if name not in rec:
            raise _field_error(path, i, name, "lacks the")
    score = rec["relevance_score"]
    if isinstance(score, bool) or not isinstance(score, Real):
        raise _field_error(path, i, "relevance_score", "has a non-numeric")
    for name in ("key_insights", "company_names"):
        items = rec[name]
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise _field_error(path, i, name, "has a non-list-of-strings")
    if not isinstance(rec["summary"], str):
        raise _field_error(path, i, "summary", "has a non-string")
    return Record.from_dict(rec)


def load_records(path: str | Path) -> list[Record]:
    """Read a JSON list of prediction or reference records and normalise each one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}).") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(raw).__name__}.")
    return [_check_record(path, i, rec) for i, rec in enumerate(raw)]


def check_pairing(
    preds: list[Record], refs: list[Record], pred_path: Path, ref_path: Path
) -> None:
    """Raise DataError unless the files have equal, non-zero length and agree on carried ids."""
    if len(preds) != len(refs):
        raise DataError(
            f"{pred_path} has {len(preds)} records but {ref_path} has {len(refs)}."
        )
    if not preds:
        raise DataError(f"{pred_path} and {ref_path} hold no records to score.")
    for i, (p, r) in enumerate(zip(preds, refs)):
        for name in ID_FIELDS:
            a, b = getattr(p, name), getattr(r, name)
            if a is not None and b is not None and a != b:
                raise DataError(
                    f"{pred_path} and {ref_path} differ at position {i}: "
                    f"{name} {a!r} vs {b!r}."
                )


def score_files(
    pred_path: str | Path, ref_path: str | Path, extra: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Aggregate metrics of a predictions file against a references file, paired by position."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    preds, refs = load_records(pred_path), load_records(ref_path)
    check_pairing(preds, refs, pred_path, ref_path)
    return aggregate_metrics(preds, refs, extra)
