"""`newsray analyze INPUT --model M --out OUT`: a trained model over new items at scale, restartable.

INPUT is JSONL, CSV or Parquet (a local path or any URI pyarrow opens: s3://, gs://, hdfs://) of
items with the task's input fields (`Task.input_fields`: news `title`, `content`; agnews `title`,
`description`). Items go through the evaluation's generation path — the same Ray Data actor pool,
engine, constrained decoding and parse rule (`newsray.evaluate.pipeline.generation_dataset`) — and
each finished batch is appended to OUT as it arrives: a JSON line per item (OUT ending in .jsonl) or
one Parquet part file per batch (any other OUT: a directory). A run started again with the same
OUT skips the items already there (by `id`), so nothing is done twice and an interruption loses at
most the batches in flight. Rows that cannot be analysed (a missing field, a prompt longer than the
model's window, a grammar failure) are written with their `error`; they never fail the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.console import progress
from newsray.errors import DataError, ray_user_errors

log = logging.getLogger(__name__)

COLUMNS = ("id", "model", "model_ref", "model_version", "answer", "valid", "output", "finish_reason", "n_new_tokens", "error")
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class AnalyzeResult:
    """What one `analyze` call did."""

    out: str
    model_ref: str  # what the model resolved to (a registry alias pinned to its version)
    rows_total: int
    rows_skipped: int  # already in OUT from an earlier run
    rows_written: int
    rows_failed: int  # written with an error
    wall_s: float


def _filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def read_items(uri: str) -> list[dict[str, Any]]:
    """The rows of a JSONL / CSV / Parquet file as dicts, each with an `id` (its own, else its row number)."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    suffix = Path(uri.split("?")[0]).suffix.lower()
    kind = FORMATS.get(suffix)
    if kind is None:
        raise DataError(f"{uri}: unknown input format {suffix or '(none)'}; use .jsonl, .csv or .parquet.")
    fs, path = _filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            table = {"json": pjson.read_json, "csv": pcsv.read_csv, "parquet": pq.read_table}[kind](f)
    except FileNotFoundError:
        raise DataError(f"{uri}: no such input file.") from None
    except Exception as e:
        raise DataError(f"{uri}: cannot be read as {kind} ({str(e).splitlines()[0][:200]}).") from None
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        row["id"] = str(row["id"]) if row.get("id") is not None else str(i)
    if len({r["id"] for r in rows}) != len(rows):
        raise DataError(f"{uri}: the id column repeats values; ids must be unique (or drop the column to number the rows).")
    return rows


def _out_kind(out: str) -> str:
    return "jsonl" if out.lower().endswith(".jsonl") else "parquet"


def done_ids(out: str) -> set[str]:
    """Ids already written to OUT by an earlier run (a JSONL line cut off by a crash is dropped and rewritten)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = _filesystem(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return set()
    if _out_kind(out) == "jsonl":
        if info.type != pafs.FileType.File:
            raise DataError(f"--out {out}: exists and is not a file; choose another --out.")
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
        lines, ids = text.splitlines(keepends=True), set()
        good = []
        for i, line in enumerate(lines):
            try:
                ids.add(str(json.loads(line)["id"]))
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                if i != len(lines) - 1:
                    raise DataError(f"--out {out}: a line other than the last is not a newsray analyze record; "
                                    "choose another --out.") from None
        if len(good) != len(lines) or (good and not good[-1].endswith("\n")):  # the crash's half line: rewrite without it
            with fs.open_output_stream(path) as f:
                f.write("".join(line if line.endswith("\n") else line + "\n" for line in good).encode())
        return ids
    if info.type != pafs.FileType.Directory:
        raise DataError(f"--out {out}: exists and is not a directory of Parquet parts; choose another --out.")
    ids = set()
    for part in fs.get_file_info(pafs.FileSelector(path)):
        if part.path.endswith(".parquet") and not part.base_name.startswith("."):  # .tmp-*: a part a crash cut off
            ids |= {str(i) for i in pq.read_table(part.path, columns=["id"], filesystem=fs).column("id").to_pylist()}
    return ids


class _Writer:
    """Appends finished rows to OUT, a batch at a time, durable before the next batch is taken."""

    def __init__(self, out: str):
        self.out, self.kind = out, _out_kind(out)
        self.fs, self.path = _filesystem(out)
        if self.kind == "parquet":
            self.fs.create_dir(self.path, recursive=True)
        else:
            parent = str(Path(self.path).parent) if "://" not in out else self.path.rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        import pyarrow.fs as pafs

        if self.kind == "jsonl":
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            if isinstance(self.fs, pafs.LocalFileSystem):
                with open(self.path, "ab") as f:  # a true append, fsynced
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:  # object stores have no append: rewrite the object with the new lines
                old = b""
                try:
                    with self.fs.open_input_stream(self.path) as f:
                        old = f.read()
                except FileNotFoundError:
                    pass
                with self.fs.open_output_stream(self.path) as f:
                    f.write(old + data)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(k, pa.int64() if k == "n_new_tokens" else pa.bool_() if k == "valid" else pa.string()) for k in COLUMNS])
        flat = [{k: json.dumps(r[k]) if k == "answer" and r.get(k) is not None else r.get(k) for k in COLUMNS} for r in rows]
        name = f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        tmp = f"{self.path}/.tmp-{name}"
        pq.write_table(pa.Table.from_pylist(flat, schema=schema), tmp, filesystem=self.fs)
        self.fs.move(tmp, f"{self.path}/{name}")  # a part is there whole or not at all


def analyze(cfg: Config, input_uri: str, model_ref: str, out: str) -> AnalyzeResult:
    """Analyse every item of INPUT not yet in OUT with `model_ref`; see the module docstring."""
    from newsray.evaluate.pipeline import generation_dataset
    from newsray.formatting import Formatter
    from newsray.generation import load_tokenizer_for, resolve_model_ref
    from newsray.raycluster import init_ray
    from newsray.registry import pin_alias
    from newsray.tasks import get_task

    started = time.perf_counter()
    task = get_task(cfg)
    rows = read_items(input_uri)
    skip = done_ids(out)
    todo = [r for r in rows if r["id"] not in skip]
    pinned = pin_alias(cfg, model_ref)
    spec = resolve_model_ref(pinned, cfg)
    version = pinned.rsplit("/", 1)[1] if pinned.startswith("models:/") and "@" not in pinned else None
    fmt = Formatter.for_tokenizer(load_tokenizer_for(spec), spec.model.max_seq_length)
    writer = _Writer(out)
    stamp = {"model": model_ref, "model_ref": pinned, "model_version": version}
    def no_answer(r: dict[str, Any], error: str) -> dict[str, Any]:  # a row not generated, written with why
        return {"id": r["id"], **stamp, "answer": None, "valid": False, "output": None, "finish_reason": None, "n_new_tokens": 0, "error": error}

    failed, items = [], []
    for r in todo:
        missing = [f for f in task.input_fields if not isinstance(r.get(f), str)]
        if missing:
            failed.append(no_answer(r, f"missing or non-text field(s) {', '.join(missing)} (the {task.name} task reads {', '.join(task.input_fields)})"))
            continue
        messages = [{"role": "user", "content": task.make_user_prompt(**{f: r[f] for f in task.input_fields})}]
        n = len(fmt.prompt_ids(messages))
        if n + cfg.eval.max_new_tokens > fmt.max_seq_length:
            failed.append(no_answer(r, f"the prompt has {n} tokens; with eval.max_new_tokens={cfg.eval.max_new_tokens} it exceeds the "
                                       f"model's {fmt.max_seq_length}-token window (model.max_seq_length)"))
            continue
        items.append({"row": len(items), "id": r["id"], "messages": json.dumps(messages)})
    writer.write(failed)
    written = len(failed)
    if items:
        init_ray(cfg, stage="evaluate")
        ids = [it["id"] for it in items]
        with progress("analyze", len(items), "rows") as advance, ray_user_errors():
            for batch in generation_dataset(cfg, pinned, spec, [{k: it[k] for k in ("row", "messages")} for it in items]).iter_batches(
                    batch_format="pandas", batch_size=None):
                out_rows = []
                for rec in batch.to_dict("records"):
                    answer, valid = task.answer_of(json.loads(rec["parsed"]))
                    error = rec.get("error") or None
                    if rec["finish_reason"] == "error" and not error:
                        error = "constrained decoding failed for this item"
                    out_rows.append({"id": ids[int(rec["row"])], **stamp, "answer": answer, "valid": valid, "output": rec["output"],
                                     "finish_reason": rec["finish_reason"], "n_new_tokens": int(rec["n_new_tokens"]), "error": error})
                writer.write(out_rows)
                written += len(out_rows)
                failed += [r for r in out_rows if r["error"]]
                advance(len(out_rows))
    return AnalyzeResult(out, pinned, len(rows), len(skip & {r["id"] for r in rows}), written, len(failed),
                         time.perf_counter() - started)
