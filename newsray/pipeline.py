"""`newsray pipeline`: tune -> train the best configuration -> evaluate baseline and tuned -> compare -> register -> serve.

`pipeline(cfg)` chains the stages' own entry functions (newsray.tune, newsray.train, newsray.evaluate,
newsray.evaluate.report, newsray.registry, newsray.serving) under one MLflow parent run (stage
pipeline; every stage's run is nested under it). The budget comes from the config's `pipeline`
section (None = the full tune/train/eval settings, e.g. of a GPU recipe). The final model trains on
the training split with the validation split held out, so its objective is measured exactly like the
trials' and the registry's champion rule compares like with like; the test set only reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.console import status
from newsray.errors import ConfigError, ModelError

STAGES = ("tune", "train", "objective", "evaluate baseline", "evaluate tuned", "compare", "register", "serve")
RECORDS = "pipeline_stages"  # artefact folder of the pipeline run: <stage>.json once a stage has finished (what --resume reads)
FAIL_ENV = "NEWSRAY_PIPELINE_FAIL_AT"  # tests: a stage name; the pipeline crashes as that stage starts, as a killed one would


@dataclass
class PipelineResult:
    """Where everything went: MLflow runs, files, the registered version and the endpoint."""

    mlflow_run_id: str  # the pipeline's parent run
    experiment: str
    tracking_uri: str
    tune_run_id: str
    best_params: dict[str, Any]
    train_run_id: str
    adapter_uri: str
    objective: str
    objective_value: float
    baseline_eval: Path
    baseline_run_id: str
    tuned_eval: Path
    tuned_run_id: str
    headline: dict[str, dict[str, float]]  # model -> a few test-set metrics
    report: Path
    compare_run_id: str
    registered: str  # models:/<name>/<version>
    champion: str  # models:/<name>@champion -> version
    champion_moved: bool
    champion_reason: str
    endpoint: str | None
    answer: dict[str, Any] | None
    stage_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def stage_configs(cfg: Config) -> tuple[Config, Config]:
    """(search config, evaluation config): the pipeline section's budget applied to tune and eval."""
    p = cfg.pipeline
    tcfg = cfg.model_copy(deep=True)
    tcfg.tune.register_best = False  # the pipeline registers the final model, not a trial
    if p.num_samples:
        tcfg.tune.num_samples = p.num_samples
    if p.max_steps_per_trial:
        tcfg.tune.max_steps_per_trial = p.max_steps_per_trial
        tcfg.tune.asha_grace_period = min(tcfg.tune.asha_grace_period, p.max_steps_per_trial)
    ecfg = cfg.model_copy(deep=True)
    if p.eval_limit:
        ecfg.eval.limit = p.eval_limit
    return tcfg, ecfg


def final_config(cfg: Config, best: dict[str, Any]) -> Config:
    """The training config of the final run: the best trial's values at the full (or pipeline) budget."""
    from newsray.search import with_params

    fcfg = with_params(cfg, best)
    if cfg.pipeline.train_max_steps:
        fcfg.train.max_steps = cfg.pipeline.train_max_steps
    fcfg.train.run_name, fcfg.train.resume = None, False
    return fcfg


def request_body(cfg: Config) -> tuple[str, dict[str, str]]:
    """(path, JSON body) of one real request: the first test item of the task."""
    from newsray.serving.app import ENDPOINT
    from newsray.tasks import get_task

    task = get_task(cfg)
    return ENDPOINT[task.name], task.request_fields(task.load().test[0])


def ask(cfg: Config, url: str, timeout_s: float = 600) -> dict[str, Any]:
    """POST one real request to the endpoint; the JSON answer (ModelError on an HTTP error)."""
    from newsray.serving.app import resolve_token

    path, body = request_body(cfg)
    headers = {"Content-Type": "application/json"}
    token = resolve_token(cfg.serve)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ModelError(f"{url}{path} answered HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # refused, reset, or no answer in time
        why = getattr(e, "reason", e)
        what = f"gave no answer within {timeout_s:g} s" if isinstance(why, TimeoutError) or isinstance(e, TimeoutError) else f"cannot be reached ({why})"
        raise ModelError(f"{url}{path} {what}; check that the Serve app is up (GET {url}/readyz).") from None
    except ValueError as e:  # not JSON
        raise ModelError(f"{url}{path} answered something that is not JSON ({str(e)[:100]}).") from None


def answer_caption(cfg: Config, r: PipelineResult) -> str:
    """What the closing answer shows: on the reduced demo budget, a model trained a few steps, said plainly."""
    steps = cfg.pipeline.train_max_steps
    what = f"{r.registered}, trained {steps} steps on the pipeline's demo budget" if steps else f"{r.registered}, trained on the config's full budget"
    repeats = [k for k, v in (r.answer or {}).items() if isinstance(v, list) and len(v) != len({json.dumps(x, sort_keys=True) for x in v})]
    if repeats and steps:
        what += (f"; its {', '.join(repeats)} repeat items: {steps} steps teach the answer's format, not yet its content. The full "
                 f"recipe (pipeline.train_max_steps=null: train.epochs over the whole training split) is what docs/RESULTS.md measures")
    return what


@contextmanager
def _stage(console: Any, times: dict[str, float], name: str, detail: str) -> Iterator[None]:
    """One stage: a header line, a spinner while it runs, its wall time at the end."""
    i = STAGES.index(name) + 1
    console.rule(f"[bold]{i}/{len(STAGES)} {name}[/bold] - {detail}")
    t0 = time.perf_counter()
    with status(f"[{i}/{len(STAGES)}] {name} ..."):
        yield
    times[name] = time.perf_counter() - t0
    console.print(f"[green]done[/green] {name} in {times[name]:.0f} s")


def _record_of(result: Any) -> dict[str, Any]:
    """A stage's result as JSON (dataclass fields; Paths as strings)."""
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else {"value": result}
    return json.loads(json.dumps(data, default=str))


def _from_record(cls: Any, record: dict[str, Any]) -> Any:
    """A stage's result back from its record (the fields the pipeline reads; Paths stay strings)."""
    if cls is None:
        return record["value"]
    return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})


def _resumable(cfg: Config) -> tuple[str, dict[str, dict[str, Any]]]:
    """pipeline.resume: the newest pipeline run of the experiment and the stages it recorded. One sentence if
    there is none, if it finished, or if it ran another config (its results would not belong to this one)."""
    import mlflow

    from newsray import tracking

    exp_id = tracking.setup(cfg)
    client = mlflow.MlflowClient()
    where = f"experiment {tracking.experiment_name(cfg)} at {tracking.tracking_uri(cfg)}"
    runs = client.search_runs([exp_id], "tags.`newsray.stage` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"pipeline.resume: there is no pipeline run in {where} to go on with; run the pipeline without --resume.")
    run = runs[0]
    if run.info.status == "FINISHED":
        raise ConfigError(f"pipeline.resume: the newest pipeline run in {where} ({run.info.run_id}) finished; "
                          "run the pipeline without --resume for a new one.")
    old, new = run.data.params, tracking.run_params(cfg)
    diff = sorted(k for k in set(old) | set(new) if k != "pipeline.resume" and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise ConfigError(f"pipeline.resume: the pipeline run {run.info.run_id} ran another config ({shown}); "
                          "resume with its config, or run the pipeline without --resume.")
    records = {}
    for art in client.list_artifacts(run.info.run_id, RECORDS):
        name = Path(art.path).stem.replace("_", " ")
        if name in STAGES:
            records[name] = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{art.path}")
    return run.info.run_id, records


def pipeline(cfg: Config) -> PipelineResult:
    """Run the whole flow on the config's budget; print progress per stage; return where everything is."""
    import mlflow

    from newsray import tracking
    from newsray.console import out as console
    from newsray.evaluate.pipeline import evaluate
    from newsray.evaluate.report import compare
    from newsray.registry import CHAMPION, objective_basis, register
    from newsray.search import objective_of, val_objective
    from newsray.tasks import get_task
    from newsray.train import train
    from newsray.tune import prepare, tune

    times, started = {}, time.perf_counter()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # logs and CI: whole stage lines
    tcfg, ecfg = stage_configs(cfg)
    objective, _ = objective_of(cfg)
    if cfg.pipeline.serve:
        from newsray.serving import check_port

        check_port(cfg)  # before the search, not after it
    prepared = prepare(tcfg)  # the search's checks (backend, precision, search space, data) before any run is opened
    from newsray.evaluate.pipeline import EvalResult
    from newsray.evaluate.report import CompareResult
    from newsray.raycluster import init_ray
    from newsray.registry import Registration
    from newsray.train import TrainResult
    from newsray.tune import TuneResult

    tracking.check_store(cfg)  # an MLflow server that does not answer: one sentence before any stage
    resumed, records = _resumable(cfg) if cfg.pipeline.resume else (None, {})  # before Ray starts
    init_ray(cfg, stage="pipeline")  # every stage's placement (and, on a cluster, its storage and MLflow) before the search
    opened = (tracking.resume_run(cfg, resumed) if resumed else
              tracking.start_run(cfg, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", stage="pipeline", data_hashes=get_task(cfg).data_hashes()))
    with opened as run:

        def stage(name: str, detail: str, fn: Any, cls: Any, record: bool = True) -> Any:
            """Run one stage and record its result in the pipeline run, or take the result a resumed run recorded."""
            if name in records:
                console.print(f"[dim]{STAGES.index(name) + 1}/{len(STAGES)} {name}: done in pipeline run {resumed}, not run again[/dim]")
                return _from_record(cls, records[name])
            if os.environ.get(FAIL_ENV) == name:
                raise RuntimeError(f"{FAIL_ENV}: the pipeline crashed as stage {name!r} started")
            with _stage(console, times, name, detail):
                result = fn()
            if record:
                mlflow.log_dict(_record_of(result), f"{RECORDS}/{name.replace(' ', '_')}.json")
            return result

        t = tcfg.tune
        n = "grid" if t.search_alg == "grid" else f"{t.num_samples} trials"
        best = stage("tune", f"{n} x {t.max_steps_per_trial} steps, {t.search_alg} search, ASHA on val_loss, objective {objective}",
                     lambda: tune(tcfg, prepared=prepared), TuneResult)
        fcfg = final_config(cfg, best.best_params)
        steps = fcfg.train.max_steps or f"{fcfg.train.epochs:g} epochs"
        trained = stage("train", f"best values {best.best_params} for {steps} steps on the training split", lambda: train(fcfg), TrainResult)

        def measure() -> float:
            if objective == "val_loss":
                return float(trained.metrics["final_val_loss"])
            return val_objective(tcfg, str(trained.adapter_dir), Path(cfg.tracking.run_dir).resolve() / "pipeline" / run.info.run_id / "val")

        value = stage("objective", f"{objective} of the final model on the validation split", measure, None)
        limit = ecfg.eval.limit or "all"
        base_ev = stage("evaluate baseline", f"{limit} test examples, Ray Data", lambda: evaluate(ecfg, "baseline"), EvalResult)
        tuned_ev = stage("evaluate tuned", f"{limit} test examples, Ray Data", lambda: evaluate(ecfg, trained.adapter_uri), EvalResult)
        cmp = stage("compare", "metric table, paired tests, plots, report",
                    lambda: compare(ecfg, [base_ev.run_id, tuned_ev.run_id], ["baseline", "tuned"]), CompareResult)
        reg = stage("register", f"newsray-{cfg.data.task}: a new version; champion only if its {objective} is better",
                    lambda: register(cfg, trained.adapter_uri, trained.mlflow_run_id, objective, value,
                                     objective_basis(cfg, get_task(cfg).data_hashes()), source=f"newsray pipeline run {run.info.run_id}"),
                    Registration)
        endpoint, answer = None, None
        if cfg.pipeline.serve:  # not recorded: a resumed run serves again
            endpoint, answer = stage("serve", f"models:/{reg.name}@{CHAMPION} on Ray Serve, one real request",
                                     lambda: _serve_once(cfg, f"models:/{reg.name}@{CHAMPION}"), None, record=False)
        keys = get_task(cfg).metric_keys("headline")
        headline = {name: {k: float(v) for k, v in ev.aggregates.items() if k in keys} for name, ev in (("baseline", base_ev), ("tuned", tuned_ev))}
        mlflow.log_metrics({f"stage_s.{k.replace(' ', '_')}": v for k, v in times.items()} | {f"final_{objective}": value})
        mlflow.set_tags({"newsray.pipeline.tune_run": best.mlflow_run_id, "newsray.pipeline.train_run": trained.mlflow_run_id,
                         "newsray.pipeline.registered": reg.uri, "newsray.pipeline.report": str(cmp.report)})
        result = PipelineResult(run.info.run_id, tracking.experiment_name(cfg), tracking.tracking_uri(cfg), best.mlflow_run_id, best.best_params,
                                trained.mlflow_run_id, trained.adapter_uri, objective, value, base_ev.out_dir, base_ev.run_id, tuned_ev.out_dir,
                                tuned_ev.run_id, headline, cmp.report, cmp.mlflow_run_id or "", reg.uri,
                                f"models:/{reg.name}@{CHAMPION} -> version {reg.champion_version}", reg.champion_moved, reg.reason,
                                endpoint, answer, times, time.perf_counter() - started)
        mlflow.log_dict(json.loads(json.dumps(result.__dict__, default=str)), "pipeline_result.json")
    if cfg.pipeline.serve and cfg.pipeline.keep_serving:
        _keep_serving(cfg, endpoint or "", console)
    return result


def _serve_once(cfg: Config, model_ref: str) -> tuple[str, dict[str, Any]]:
    """Start Serve on model_ref, answer one real request, and stop it unless pipeline.keep_serving."""
    from newsray import serving
    from newsray.serving.app import shutdown

    url = serving.run(cfg, model_ref, blocking=False)
    try:
        answer = ask(cfg, url)
    except BaseException:
        shutdown(cfg)
        raise
    if not cfg.pipeline.keep_serving:
        shutdown(cfg)
    return url, answer


def _keep_serving(cfg: Config, url: str, console: Any) -> None:
    """Leave the endpoint up until Ctrl-C, then shut Serve (and the in-process Ray) down."""
    from newsray.serving.app import shutdown

    console.print(f"serving at {url} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown(cfg)
