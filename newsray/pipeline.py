"""`newsray pipeline`: tune -> train the best configuration -> evaluate baseline and tuned -> compare -> register -> serve.

`pipeline(cfg)` chains the stages' own entry functions (newsray.tune, newsray.train, newsray.evaluate,
newsray.evaluate.report, newsray.registry, newsray.serving) under one MLflow parent run (stage
pipeline; every stage's run is nested under it). The budget comes from the config's `pipeline`
section (None = the full tune/train/eval settings, e.g. of a GPU recipe). The final model trains on
the training split with the validation split held out, so its objective is measured exactly like the
trials' and the registry's champion rule compares like with like; the test set only reports.
"""

from __future__ import annotations

import json
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
from newsray.errors import ModelError

STAGES = ("tune", "train", "objective", "evaluate baseline", "evaluate tuned", "compare", "register", "serve")


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

    ex = get_task(cfg).load().test[0]
    if cfg.data.task == "news":
        body = {"title": str(ex.meta.get("article_title") or ex.id), "content": str(ex.meta.get("truncated_content") or ex.meta.get("original_content") or ex.user)}
    else:
        body = {"title": str(ex.meta.get("title") or ex.user)}
    return ENDPOINT[cfg.data.task], body


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
    import transformers  # noqa: F401 - before Ray: in a submitted job, joining the cluster can re-extract the job's
    # working dir (the cwd) under the same path, and transformers reads the cwd when it is first imported

    from newsray.raycluster import init_ray

    init_ray(cfg, stage="pipeline")  # every stage's placement (and, on a cluster, its storage and MLflow) before the search
    with tracking.start_run(cfg, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", stage="pipeline",
                            data_hashes=get_task(cfg).data_hashes()) as run:
        t = tcfg.tune
        n = "grid" if t.search_alg == "grid" else f"{t.num_samples} trials"
        with _stage(console, times, "tune", f"{n} x {t.max_steps_per_trial} steps, {t.search_alg} search, ASHA on val_loss, objective {objective}"):
            best = tune(tcfg, prepared=prepared)
        fcfg = final_config(cfg, best.best_params)
        steps = fcfg.train.max_steps or f"{fcfg.train.epochs:g} epochs"
        with _stage(console, times, "train", f"best values {best.best_params} for {steps} steps on the training split"):
            trained = train(fcfg)
        with _stage(console, times, "objective", f"{objective} of the final model on the validation split"):
            if objective == "val_loss":
                value = float(trained.metrics["final_val_loss"])
            else:
                value = val_objective(tcfg, str(trained.adapter_dir), Path(cfg.tracking.run_dir).resolve() / "pipeline" / run.info.run_id / "val")
        limit = ecfg.eval.limit or "all"
        with _stage(console, times, "evaluate baseline", f"{limit} test examples, Ray Data"):
            base_ev = evaluate(ecfg, "baseline")
        with _stage(console, times, "evaluate tuned", f"{limit} test examples, Ray Data"):
            tuned_ev = evaluate(ecfg, trained.adapter_uri)
        with _stage(console, times, "compare", "metric table, paired tests, plots, report"):
            cmp = compare(ecfg, [base_ev.run_id, tuned_ev.run_id], ["baseline", "tuned"])
        with _stage(console, times, "register", f"newsray-{cfg.data.task}: a new version; champion only if its {objective} is better"):
            reg = register(cfg, trained.adapter_uri, trained.mlflow_run_id, objective, value, objective_basis(cfg, get_task(cfg).data_hashes()),
                           source=f"newsray pipeline run {run.info.run_id}")
        endpoint, answer = None, None
        if cfg.pipeline.serve:
            with _stage(console, times, "serve", f"models:/{reg.name}@{CHAMPION} on Ray Serve, one real request"):
                endpoint, answer = _serve_once(cfg, f"models:/{reg.name}@{CHAMPION}")
        keys = ("field_f1_overall", "json_validation_rate", "relevance_mae", "accuracy", "macro_f1")
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
