"""Evaluation outputs to compare: local evaluation directories or MLflow runs (artefacts under `eval/`).

The file contract of an evaluation (newsray evaluate): predictions.json, references.json, and
optionally eval_info.json, aggregates.json, per_example.json, raw_outputs.jsonl.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsray.errors import DataError
from newsray.evaluate.scoring import check_pairing, load_records
from newsray.tasks import TASKS, task_type

EVAL_ARTIFACT_DIR = "eval"
_RUN_ID = re.compile(r"^[0-9a-zA-Z_-]{8,64}$")


@dataclass
class EvalSource:
    """One evaluation, loaded: its predictions and references (news Records or AG News dicts)."""

    name: str
    source: str
    path: Path
    task: str
    predictions: list[Any]
    references: list[Any]
    info: dict[str, Any] = field(default_factory=dict)
    aggregates: dict[str, Any] | None = None
    run_id: str | None = None

    def reference_ids(self) -> list[Any]:
        """The id of each reference record (news: id, else example_id)."""
        return [task_type(self.task).reference_id(r) for r in self.references]


def _read_json(path: Path, what: str) -> Any:
    """Parse one JSON file of an evaluation, or raise a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: {what} is missing; an evaluation directory holds predictions.json and references.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}).") from None


def _detect_task(path: Path, info: dict[str, Any], tags: dict[str, str]) -> str:
    """The task from eval_info.json, the run's newsray.task tag, or the shape of the first prediction."""
    task = info.get("task") or tags.get("newsray.task")
    if task is None:
        first = (_read_json(path / "predictions.json", "predictions.json") or [{}])[0]
        task = next(name for name in TASKS if task_type(name).claims(first))
    if task not in TASKS:
        raise DataError(f"{path}: unknown task {task!r} in eval_info.json; expected {' or '.join(TASKS)}.")
    return task


def _agnews_records(path: Path, what: str, gold_keys: Sequence[str]) -> list[dict[str, Any]]:
    """AG News records with an id and a gold label (any of gold_keys); predicted may be null."""
    raw = _read_json(path, what)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON list of records.")
    out = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is not a JSON object.")
        gold = next((rec[k] for k in gold_keys if k in rec), None)
        if not isinstance(gold, str):
            raise DataError(f"{path}: record {i} lacks a string gold label (field {gold_keys[0]!r}).")
        out.append({**rec, "gold": gold})
    return out


def load_dir(path: Path, name: str, source: str, tags: dict[str, str] | None = None, run_id: str | None = None) -> EvalSource:
    """Load and check one evaluation directory (predictions paired with references by position)."""
    info_path = path / "eval_info.json"
    info = _read_json(info_path, "eval_info.json") if info_path.is_file() else {}
    task = _detect_task(path, info, tags or {})
    pred_path, ref_path = path / "predictions.json", path / "references.json"
    if task_type(task).suite == "fields":
        preds: list[Any] = load_records(pred_path)
        refs: list[Any] = load_records(ref_path)
        check_pairing(preds, refs, pred_path, ref_path)
    else:
        preds = _agnews_records(pred_path, "predictions.json", ("gold",))
        refs = _agnews_records(ref_path, "references.json", ("gold", "label", "answer"))
        if len(preds) != len(refs):
            raise DataError(f"{pred_path} has {len(preds)} records but {ref_path} has {len(refs)}.")
        for i, (p, r) in enumerate(zip(preds, refs)):
            if p.get("id") != r.get("id") or p["gold"] != r["gold"]:
                raise DataError(f"{pred_path} and {ref_path} differ at position {i}: id/gold {p.get('id')!r}/{p['gold']!r} vs {r.get('id')!r}/{r['gold']!r}.")
    agg_path = path / "aggregates.json"
    aggregates = _read_json(agg_path, "aggregates.json") if agg_path.is_file() else None
    return EvalSource(name, source, path, task, preds, refs, info, aggregates, run_id)


def _download_run(run_id: str, tracking_uri: str, dst: Path) -> tuple[Path, str, dict[str, str]]:
    """Download a run's eval/ artefacts; returns (local dir, run name, tags)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise DataError(f"MLflow run {run_id!r} not found in {tracking_uri}; pass an evaluation run id or an evaluation directory.") from None
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EVAL_ARTIFACT_DIR, dst_path=str(dst), tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        local = None
    if local is None or not (Path(local) / "predictions.json").is_file():
        raise DataError(f"MLflow run {run_id!r} has no {EVAL_ARTIFACT_DIR}/predictions.json artefact; is it a `newsray evaluate` run?")
    return Path(local), run.info.run_name or run_id[:8], dict(run.data.tags)


def load_source(source: str, name: str | None, tracking_uri: str, workdir: Path, references: Path | None = None) -> EvalSource:
    """An evaluation directory, an MLflow run id (`runs:/<id>` accepted), or a news predictions file + references."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_dir(path.resolve(), name or path.resolve().name, source)
    if path.is_file():
        if references is None:
            raise DataError(f"{source}: a predictions file needs --references REFERENCES.json (or pass an evaluation directory).")
        built = write_news_eval_dir(workdir / f"file-{len(list(workdir.iterdir()))}", path.resolve(), Path(references).resolve())
        return load_dir(built, name or path.stem, source)
    run_id = source[len("runs:/"):].split("/")[0] if source.startswith("runs:/") else source
    if not _RUN_ID.match(run_id):
        raise DataError(f"{source}: neither an evaluation directory nor an MLflow run id.")
    local, run_name, tags = _download_run(run_id, tracking_uri, workdir / run_id)
    if name is None and tags.get("newsray.constrained") == "true" and "constrained" not in run_name:
        run_name += "-constrained"  # the same model evaluated in both modes gets two readable names
    return load_dir(local, name or run_name, source, tags, run_id)


def unique_names(names: Sequence[str]) -> list[str]:
    """Names made unique by suffixing -2, -3, ... to repeats."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def check_same(sources: Sequence[EvalSource]) -> str:
    """Raise DataError unless all sources share one task and the same references; returns the task."""
    first = sources[0]
    for other in sources[1:]:
        if len({first.task, other.task}) > 1:
            raise DataError(f"{first.source} is a {first.task} evaluation but {other.source} is {other.task}; compare evaluations of one task.")
        a, b = first.reference_ids(), other.reference_ids()
        if len(a) != len(b):
            raise DataError(f"{first.source} has {len(a)} references but {other.source} has {len(b)}; compare evaluations of the same test set.")
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                raise DataError(f"{first.source} and {other.source} have different references: id {x!r} vs {y!r} at position {i}.")
        for i, (x, y) in enumerate(zip(first.references, other.references)):
            if not task_type(first.task).same_reference(x, y):
                raise DataError(f"{first.source} and {other.source} have different reference contents at position {i} (id {a[i]!r}).")
    return first.task


def write_news_eval_dir(out: Path, predictions: Path, references: Path, info: dict[str, Any] | None = None) -> Path:
    """Turn a news predictions file + references file (e.g. the published ones) into an evaluation directory."""
    from newsray.evaluate.metrics import aggregate_metrics, per_example_metrics
    from newsray.tasks.news import NewsTask

    preds, refs = load_records(predictions), load_records(references)
    check_pairing(preds, refs, predictions, references)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "predictions.json": json.loads(predictions.read_text(encoding="utf-8")),
        "references.json": json.loads(references.read_text(encoding="utf-8")),
        "per_example.json": per_example_metrics(preds, refs),
        "aggregates.json": aggregate_metrics(preds, refs),
        "eval_info.json": {"task": NewsTask.name, "model_ref": str(predictions), "n": len(preds), **(info or {})},
    }
    for name, data in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(out / name)
    return out
