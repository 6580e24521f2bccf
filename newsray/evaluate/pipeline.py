"""`evaluate`: the task's test set through a Ray Data actor pool (generate -> parse), then score and log.

Each actor loads base + adapter once (newsray.generation) in eval.dtype and queues its rows on its
engine, which decodes eval.batch_size of them at a time and refills a finished row's slot at the
next step (continuous batching); rows come back in any order and are put back in test-set order
by their position. Ray Data retries the
batch of an actor that dies on its restarted actor (restarts bounded by eval.max_actor_restarts). The files of docs/EVALUATION.md
are written atomically into the output directory, then one MLflow run records them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import newsray
from newsray.config import Config
from newsray.console import progress
from newsray.errors import ConfigError, DataError, NewsrayError, ray_user_errors
from newsray.generation import ModelSpec, load_generator, model_slug, on_device, resolve_model_ref, vllm
from newsray.raycluster import init_ray
from newsray.tasks import Example, get_task, task_type

log = logging.getLogger(__name__)

# Test hook: "<rows>:<marker file>" makes a generation actor SIGKILL itself once, after it has
# generated <rows> rows and before it returns that batch (the marker file records that it did).
FAULT_ENV = "NEWSRAY_EVAL_FAULT"
FILES = ("raw_outputs.jsonl", "predictions.json", "references.json", "per_example.json", "aggregates.json", "eval_info.json")


@dataclass(frozen=True)
class EvalResult:
    """Where the files went, the MLflow run that holds them, and the aggregate metrics."""

    out_dir: Path
    run_id: str
    aggregates: dict[str, Any]
    n: int
    wall_s: float


class GeneratorActor:
    """A Ray Data actor: loads the model once, then generates and parses batches of rows."""

    def __init__(self, cfg: Config, model_ref: str, spec: ModelSpec, fault: str | None = None):
        self.rows_done, self.fault, self.error = 0, fault, None
        try:
            self._load(cfg, model_ref, spec)
        except NewsrayError as e:
            # raised again with the first batch: an error in an actor's __init__ reaches the driver as text in
            # Ray's ActorDiedError, one in a batch as itself (evaluate and analyze then print its one sentence)
            self.error = e

    def _load(self, cfg: Config, model_ref: str, spec: ModelSpec) -> None:
        import torch

        if cfg.eval.gpus_per_actor > 0 and not torch.cuda.is_available():
            import ray

            raise ConfigError(f"eval.gpus_per_actor={cfg.eval.gpus_per_actor:g}: Ray gave this actor a GPU on node "
                              f"{ray.util.get_node_ip_address()}, but its torch {torch.__version__} sees no CUDA device; install a "
                              "CUDA build of torch there, or set eval.gpus_per_actor=0 to generate on CPUs.")
        device = "cuda" if cfg.eval.gpus_per_actor > 0 else "cpu"
        spec = on_device(spec, cfg.eval.dtype, device)
        self.gen = load_generator(model_ref, cfg, device, num_threads=cfg.eval.cpus_per_actor, spec=spec, slots=cfg.eval.batch_size)
        self.dtype = spec.model.dtype
        self.task, self.max_new_tokens, self.constrained = cfg.data.task, cfg.eval.max_new_tokens, cfg.eval.constrained

    def _maybe_crash(self) -> None:
        """The FAULT_ENV hook: die once (SIGKILL, no cleanup), as a crashed or preempted actor would."""
        if not self.fault:
            return
        rows, _, marker = self.fault.partition(":")
        if self.rows_done >= int(rows) and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        if self.error is not None:
            raise self.error
        messages = [json.loads(m) for m in batch["messages"]]
        t0 = time.perf_counter()
        results = self.gen.generate(messages, self.max_new_tokens, self.constrained)
        latency = time.perf_counter() - t0
        self.rows_done += len(messages)
        self._maybe_crash()
        return {
            "row": [int(r) for r in batch["row"]],
            "prompt": [self.gen.formatter.prompt(m) for m in messages],
            "output": [r.text for r in results],
            "n_new_tokens": [r.n_new_tokens for r in results],
            "finish_reason": [r.finish_reason for r in results],
            "latency_s": [latency] * len(results),
            "parsed": [json.dumps(task_type(self.task).parse_output(r.text)) for r in results],
            "actor_pid": [os.getpid()] * len(results),
            "dtype": [self.dtype] * len(results),
            "engine": ["newsray"] * len(results),
            "error": [r.error for r in results],  # finish_reason "error": why (the row is kept as data)
        }


def _generate(cfg: Config, model_ref: str, spec: ModelSpec, examples: list[Example], out: Path) -> tuple[list[dict[str, Any]], int]:
    """Run the actor pool (or vLLM's processor, eval.engine) over the examples: (rows in test-set order, each
    exactly once; how many of them an earlier run had generated).

    Every row is appended to out/generations.jsonl as it arrives; rows already there from an earlier,
    interrupted run of the same evaluation (same --out) are reused and only the others generated.
    """
    items = [{"row": i, "messages": json.dumps(ex.messages())} for i, ex in enumerate(examples)]
    path, key = out / GENERATIONS_FILE, _generation_key(cfg, model_ref, spec)
    earlier = _read_generations(path, key)
    rows, pending = [], []
    for it in items:
        same = earlier.get(it["messages"])
        if same:
            rows.append(same.pop() | {"row": it["row"]})
        else:
            pending.append(it)
    if rows:
        log.warning("%d of %d rows already generated in %s (an interrupted run): generating the other %d", len(rows), len(items), path,
                    len(pending))
    messages = {it["row"]: it["messages"] for it in items}
    with open(path, "a", encoding="utf-8") as f, progress("generate", len(items), "rows") as advance:
        advance(len(rows))

        def keep(row: dict[str, Any]) -> None:
            row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}  # numpy scalars from Ray Data
            f.write(json.dumps({"key": key, "messages": messages[int(row["row"])]} | row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            rows.append(row)
            advance(1)

        reused = len(rows)
        if pending and vllm.choose(cfg.eval.engine, cfg.eval.gpus_per_actor) == "vllm":
            for row in _vllm_rows(cfg, spec, pending):
                keep(row)
        elif pending:
            pending.sort(key=lambda it: len(it["messages"]))  # similar lengths batch together (less padding); "row" restores order
            with ray_user_errors():  # e.g. an actor's ConfigError: one sentence, the rows kept so far stay on disk
                for row in generation_dataset(cfg, model_ref, spec, pending).iter_rows():
                    keep(row)
    rows.sort(key=lambda r: int(r["row"]))
    got = [int(r["row"]) for r in rows]
    if got != list(range(len(examples))):
        missing = sorted(set(range(len(examples))) - set(got))
        dup = sorted({g for g in got if got.count(g) > 1})
        raise RuntimeError(f"evaluation lost rows {missing[:10]} or duplicated rows {dup[:10]} of {len(examples)}")
    return rows, reused


GENERATIONS_FILE = "generations.jsonl"  # rows as they finish; removed once raw_outputs.jsonl holds them all


def _generation_key(cfg: Config, model_ref: str, spec: ModelSpec) -> dict[str, Any]:
    """What makes a generated row reusable by a re-run: the model (its reference, base and adapter weights,
    so a moved alias or a retrained directory does not pass) and every setting that changes its text."""
    import hashlib

    e, digest = cfg.eval, None
    if spec.adapter_dir is not None:
        h = hashlib.sha256()
        for f in sorted(Path(spec.adapter_dir).glob("adapter_model.*")):
            h.update(f.read_bytes())
        digest = h.hexdigest()[:16]
    return {"task": cfg.data.task, "model": model_ref, "base": spec.model.name, "adapter_sha256": digest,
            "max_new_tokens": e.max_new_tokens, "constrained": e.constrained, "dtype": e.dtype, "engine": e.engine}


def _read_generations(path: Path, key: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The rows an earlier run of this evaluation left in `path`, by prompt (messages JSON). A last line
    cut off mid-write is dropped (the file is truncated to the last whole line); rows of another
    evaluation are refused with one sentence rather than mixed in or deleted."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    found: dict[str, list[dict[str, Any]]] = {}
    for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n}: not a JSON line; remove the file to generate every row again.") from None
        if rec.get("key") != key:
            diff = ", ".join(f"{k}={rec.get('key', {}).get(k)!r} (now {v!r})" for k, v in key.items() if rec.get("key", {}).get(k) != v)
            raise ConfigError(f"{path} holds the generations of another evaluation ({diff}); use another --out, or remove the file.")
        found.setdefault(rec.pop("messages"), []).append({k: v for k, v in rec.items() if k != "key"})
    return found


def generation_dataset(cfg: Config, model_ref: str, spec: ModelSpec, items: list[dict[str, Any]]) -> Any:
    """The lazy Ray Data dataset of `items` ({"row", "messages": JSON chat}) through the GeneratorActor pool:
    one output row per item, in any order. evaluate takes all of it; `newsray analyze` streams it."""
    import ray

    e = cfg.eval
    # Rows per actor call: enough to keep the engine's eval.batch_size slots full (continuous batching
    # drains only at the end of a call), at least two calls per actor so every actor gets rows, at
    # most 4 x slots so a crashed actor repeats little.
    per_call = min(len(items), max(e.batch_size, math.ceil(len(items) / (2 * e.num_actors))), 4 * e.batch_size)
    # A UDF's exception as itself, not as Ray Data's UserCodeException (which loses it on the way to the driver):
    # a NewsrayError raised in an actor then ends evaluate/analyze with its one sentence.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_call)))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries (its actor pool reads
        # them from **ray_remote_args, which warns that it is deprecated). Restarts are bounded; an
        # actor task is retried until it succeeds or its actor is dead for good (max_task_retries=-1):
        # a node that dies leaves its actor "temporarily unavailable" (ActorUnavailableError) for
        # seconds before Ray declares it dead and restarts it, and a bounded count of task retries
        # is used up in that window (measured: the job failed). Ray keeps one result per task: no
        # row is lost or duplicated (checked below).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        out = ds.map_batches(
            GeneratorActor,
            fn_constructor_kwargs={"cfg": cfg, "model_ref": model_ref, "spec": spec, "fault": os.environ.get(FAULT_ENV)},
            compute=ray.data.ActorPoolStrategy(size=e.num_actors),
            num_cpus=e.cpus_per_actor,
            num_gpus=e.gpus_per_actor or None,
            batch_size=per_call,
            max_restarts=e.max_actor_restarts,
            max_task_retries=-1 if e.max_actor_restarts else 0,
        )
    return out


def _vllm_rows(cfg: Config, spec: ModelSpec, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """eval.engine=vllm: the rows through ray.data.llm (newsray.generation.vllm), in the actor pool's row layout."""
    from newsray.formatting import Formatter
    from newsray.generation import load_tokenizer_for

    spec = on_device(spec, cfg.eval.dtype, "cuda")
    fmt = Formatter.for_tokenizer(load_tokenizer_for(spec), spec.model.max_seq_length)
    t0 = time.perf_counter()
    out = vllm.evaluate_rows(cfg, spec, items)
    latency = time.perf_counter() - t0
    messages = {it["row"]: json.loads(it["messages"]) for it in items}
    return [r | {"prompt": fmt.prompt(messages[r["row"]]), "latency_s": latency, "parsed": json.dumps(task_type(cfg.data.task).parse_output(r["output"])),
                 "actor_pid": 0, "dtype": spec.model.dtype, "engine": "vllm"} for r in out]


def _atomic_write(path: Path, text: str) -> None:
    """Write text to path via a temporary file in the same directory and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dump(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def numeric_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) aggregate dict as flat MLflow metrics: per_class.World.f1, ..."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= numeric_metrics(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def default_out_dir(cfg: Config, model_ref: str) -> Path:
    """<tracking.run_dir>/eval/<YYYYmmdd-HHMMSS>-<task>-<model-slug>[-constrained] (made unique)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{cfg.data.task}-{model_slug(model_ref)}" + ("-constrained" if cfg.eval.constrained else "")
    path = Path(cfg.tracking.run_dir).resolve() / "eval" / name
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"{name}-{n}")
    return path


def _log_mlflow(cfg: Config, model_ref: str, out_dir: Path, aggregates: dict[str, Any], info: dict[str, Any],
                data_hashes: dict[str, str]) -> str:
    """One MLflow run (stage evaluate): aggregates as metrics, the files as artefacts under eval/."""
    import mlflow

    from newsray import tracking

    with tracking.start_run(cfg, run_name=f"eval-{model_slug(model_ref)}", stage="evaluate", data_hashes=data_hashes) as run:
        mlflow.set_tags({"newsray.split": info.get("split", "test"), "newsray.model_ref": model_ref, "newsray.constrained": str(cfg.eval.constrained).lower(),
                         "newsray.base_model": info["base_model"], "newsray.eval_dir": str(out_dir)})
        mlflow.log_metrics(numeric_metrics(aggregates))
        info["mlflow_run_id"] = run.info.run_id
        _dump(out_dir / "eval_info.json", info)
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
        return run.info.run_id


def evaluate(cfg: Config, model_ref: str = "baseline", out_dir: Path | None = None, split: Literal["test", "val"] = "test") -> EvalResult:
    """Generate, parse and score the task's test (or validation) split with `model_ref`; write the files; log one MLflow run."""
    t0 = time.perf_counter()
    task = get_task(cfg)
    examples = getattr(task.load(), split)[: cfg.eval.limit]
    if not examples:
        hint = "set data.val_fraction > 0" if split == "val" else "check data.test_file / data.test_rows"
        raise DataError(f"the {task.name} {split} split is empty; {hint}.")
    from newsray import tracking

    tracking.check_store(cfg)  # an MLflow server that does not answer: one sentence now, not after the generation
    spec = resolve_model_ref(model_ref, cfg)  # ModelError before any Ray work
    out = Path(out_dir).resolve() if out_dir else default_out_dir(cfg, model_ref)
    _read_generations(out / GENERATIONS_FILE, _generation_key(cfg, model_ref, spec))  # another evaluation's rows: refused before Ray starts
    init_ray(cfg, stage="evaluate")
    out.mkdir(parents=True, exist_ok=True)
    t_gen = time.perf_counter()
    rows, reused = _generate(cfg, model_ref, spec, examples, out)
    gen_s = time.perf_counter() - t_gen
    preds, refs, per_example, aggregates = task.score(examples, rows)
    aggregates = {**aggregates, "n": len(examples), "examples_per_s": (len(examples) - reused) / gen_s}  # the rows generated by this run
    raw = [{"id": i, "item_id": ex.id, "prompt": row["prompt"], "output": row["output"], "n_new_tokens": int(row["n_new_tokens"]),
            "finish_reason": row["finish_reason"], "error": row.get("error"), "latency_s": float(row["latency_s"]), "actor_pid": int(row["actor_pid"])}
           for i, (ex, row) in enumerate(zip(examples, rows))]
    _atomic_write(out / "raw_outputs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw))
    (out / GENERATIONS_FILE).unlink(missing_ok=True)  # every row is in raw_outputs.jsonl now
    _dump(out / "predictions.json", preds)
    _dump(out / "references.json", refs)
    _dump(out / "per_example.json", per_example)
    _dump(out / "aggregates.json", aggregates)
    from newsray.tracking import git_commit

    info = {"task": task.name, "split": split, "model_ref": model_ref, "base_model": spec.model.name, "constrained": cfg.eval.constrained,
            "max_new_tokens": cfg.eval.max_new_tokens, "n": len(examples), "wall_s": time.perf_counter() - t0,
            "generation_s": gen_s, "reused_rows": reused, "batch_size": cfg.eval.batch_size, "num_actors": cfg.eval.num_actors,
            "dtype": rows[0]["dtype"], "engine": rows[0]["engine"],
            "newsray_version": newsray.__version__, "git_commit": git_commit()}
    _dump(out / "eval_info.json", info)
    run_id = _log_mlflow(cfg, model_ref, out, aggregates, info, task.data_hashes())
    log.info("evaluation of %s on %d %s examples: %s (MLflow run %s)", model_ref, len(examples), task.name, out, run_id)
    return EvalResult(out, run_id, aggregates, len(examples), info["wall_s"])
