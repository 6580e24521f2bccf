"""The search of `newsray tune`: the space from the config, its checks, and the Tune trial trainable.

Train V2 pattern: each trial is a Tune *function* trainable (`run_trial`) that builds the run's
TorchTrainer (`newsray.train.driver.build_trainer`) with `TuneReportCallback` and calls `fit()`, so
every `ray.train.report` of the workers (loss per step, val_loss every `asha_grace_period` steps)
reaches Tune and its ASHA scheduler. A completed trial reports its objective (val_loss, or f1 /
accuracy computed by `newsray.evaluate` on the validation split), logs its adapter into its own
nested MLflow run, and marks that run FINISHED; a failing one marks it FAILED and raises.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.errors import ConfigError
from newsray.registry import MODES

log = logging.getLogger(__name__)

FAIL_ENV = "NEWSRAY_TEST_FAIL_TRIAL"  # test hook: "lora_r=8" makes the trials with that value raise
EVAL_KEYS = {"f1": "field_f1_overall", "accuracy": "accuracy"}  # objective -> newsray.evaluate aggregate


# --------------------------------------------------------------------------------------
# The search space and its checks


def objective_of(cfg: Config) -> tuple[str, str]:
    """(objective, min|max); ConfigError if the task does not have it."""
    from newsray.tasks import task_type

    obj, task = cfg.tune.objective, cfg.data.task
    objectives = task_type(task).objectives
    if obj not in objectives:
        raise ConfigError(f"tune.objective={obj}: the {task} task has no {obj} objective; use one of {', '.join(objectives)}.")
    return obj, MODES[obj]


def check_search_space(cfg: Config, n_train: int | None = None, source: str = "the training data") -> None:
    """Every check of the tune section that needs no Ray: one ConfigError sentence naming the field."""
    t, w = cfg.tune, cfg.train.num_workers
    objective_of(cfg)
    lo, hi = t.learning_rate
    if not 0 < lo < hi:
        raise ConfigError(f"tune.learning_rate: [{lo:g}, {hi:g}] is not a range; give [low, high] with 0 < low < high, e.g. tune.learning_rate=[1e-4,1e-3].")
    for key, values in (("lora_r", t.lora_r), ("batch_size", t.batch_size)):
        if not values:
            raise ConfigError(f"tune.{key} is empty: list at least one value to search, e.g. tune.{key}=[{'8,16' if key == 'lora_r' else '2,4'}].")
        if min(values) <= 0:
            raise ConfigError(f"tune.{key}: {min(values)} is not a positive integer; every value must be >= 1.")
    if t.warmup_steps and min(t.warmup_steps) < 0:
        raise ConfigError(f"tune.warmup_steps: {min(t.warmup_steps)} is negative; warm-up steps must be >= 0.")
    if cfg.data.val_fraction <= 0:
        raise ConfigError("tune needs a validation split but data.val_fraction is 0; set it, e.g. data.val_fraction=0.1.")
    if t.asha_grace_period > t.max_steps_per_trial:
        raise ConfigError(f"tune.asha_grace_period={t.asha_grace_period} exceeds tune.max_steps_per_trial={t.max_steps_per_trial}; "
                          "ASHA could never stop a trial: lower the grace period or raise the steps.")
    if t.gpus_per_trial not in (0, w):
        raise ConfigError(f"tune.gpus_per_trial={t.gpus_per_trial:g}: use 0 (CPU) or train.num_workers={w} (one GPU per Train worker).")
    if t.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search_alg=optuna needs Optuna, which is not installed: pip install optuna (or use tune.search_alg=random).") from None
    if n_train is not None and max(t.batch_size) * w > n_train:
        fits = [b for b in t.batch_size if b * w <= n_train]
        raise ConfigError(f"tune.batch_size: {max(t.batch_size)} x train.num_workers={w} examples per step, but {source} gives only "
                          f"{n_train} usable training examples; drop the sizes above {n_train // w}" + (f" (keep {fits})." if fits else "."))


def check_resources(cfg: Config, cluster_cpus: float, in_process: bool) -> None:
    """Concurrent trials (driver + workers) must fit in an in-process Ray, or they would wait forever."""
    t = cfg.tune
    need = t.max_concurrent_trials * (t.driver_cpus + t.cpus_per_trial)
    if need > cluster_cpus + 1e-9 and in_process:
        raise ConfigError(f"tune.max_concurrent_trials={t.max_concurrent_trials} x (tune.driver_cpus={t.driver_cpus:g} + tune.cpus_per_trial="
                          f"{t.cpus_per_trial:g}) = {need:g} CPUs but the Ray cluster has {cluster_cpus:g}; lower them or use a bigger cluster.")


def grid_learning_rates(cfg: Config) -> list[float]:
    """tune.grid_lr_points learning rates, log-spaced over tune.learning_rate."""
    (lo, hi), n = cfg.tune.learning_rate, cfg.tune.grid_lr_points
    return [lo] if n == 1 else [float(f"{lo * (hi / lo) ** (i / (n - 1)):.4g}") for i in range(n)]


def param_space(cfg: Config) -> dict[str, Any]:
    """The Tune search space: log-uniform lr and choices (random/optuna), or their grid."""
    from ray import tune

    t = cfg.tune
    if t.search_alg == "grid":
        space = {"learning_rate": tune.grid_search(grid_learning_rates(cfg)), "lora_r": tune.grid_search(list(t.lora_r)),
                 "batch_size": tune.grid_search(list(t.batch_size))}
        if t.warmup_steps:
            space["warmup_steps"] = tune.grid_search(list(t.warmup_steps))
        return space
    space = {"learning_rate": tune.loguniform(*t.learning_rate), "lora_r": tune.choice(list(t.lora_r)),
             "batch_size": tune.choice(list(t.batch_size))}
    if t.warmup_steps:
        space["warmup_steps"] = tune.choice(list(t.warmup_steps))
    return space


def lora_alpha(cfg: Config, r: int) -> int:
    """LoRA alpha from the rank by tune.alpha_rule."""
    return {"equal": r, "double": 2 * r, "fixed": cfg.lora.alpha}[cfg.tune.alpha_rule]


def with_params(base: Config, params: dict[str, Any]) -> Config:
    """A copy of `base` with a trial's values (lr, rank, alpha by tune.alpha_rule, batch, warm-up) applied."""
    cfg = base.model_copy(deep=True)
    cfg.train.learning_rate = float(params["learning_rate"])
    cfg.lora.r = int(params["lora_r"])
    cfg.lora.alpha = lora_alpha(base, cfg.lora.r)
    cfg.train.per_device_batch_size = int(params["batch_size"])
    if "warmup_steps" in params:
        cfg.train.warmup_steps = int(params["warmup_steps"])
    return cfg


def trial_config(base: Config, params: dict[str, Any], train_storage: str, run_name: str) -> Config:
    """The Config of one trial: the sampled values, the trial budget and its own Ray Train run."""
    cfg = with_params(base, params)
    t = base.tune
    cfg.train.max_steps = t.max_steps_per_trial
    cfg.train.checkpoint_every_steps = t.asha_grace_period  # val_loss at every multiple: ASHA's rungs
    cfg.train.keep_checkpoints = 1
    cfg.train.use_gpu = t.gpus_per_trial > 0
    cfg.train.cpus_per_worker = t.cpus_per_trial / cfg.train.num_workers
    cfg.train.storage_path, cfg.train.run_name = train_storage, run_name
    cfg.train.resume = Path(train_storage, run_name).is_dir()  # a trial restarted by --resume continues its checkpoints
    return cfg


def searcher(cfg: Config, metric: str, mode: str) -> Any:
    """Random (seeded), grid (every combination once) or Optuna TPE (seeded), at most max_concurrent_trials at once."""
    n = cfg.tune.max_concurrent_trials
    if cfg.tune.search_alg == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, sampler=TPESampler(seed=cfg.train.seed)), max_concurrent=n)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator passed in: give it here.
    return BasicVariantGenerator(random_state=cfg.train.seed if cfg.tune.search_alg == "random" else None, max_concurrent=n)


def expected_trials(cfg: Config) -> int:
    """How many trials the search makes: num_samples, or every grid combination once."""
    t = cfg.tune
    if t.search_alg != "grid":
        return t.num_samples
    return len(grid_learning_rates(cfg)) * len(t.lora_r) * len(t.batch_size) * max(1, len(t.warmup_steps))


def scheduler(cfg: Config) -> Any:
    """ASHA on validation loss, with the training step as time.

    max_t is one past the last step: ASHA stops every trial that reaches max_t, and a trial must
    live past its last step to report its objective and log its adapter.
    """
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    return ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=t.max_steps_per_trial + 1,
                         grace_period=t.asha_grace_period, reduction_factor=t.asha_reduction_factor)


# --------------------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor has died; returns how many.

    When ASHA stops a trial, Tune kills the trial actor and with it the Train controller it owns.
    The worker group's placement group outlives them (a non-detached placement group lives as long as
    its job, the Tune driver), so its CPUs would stay reserved and the next trial's workers would wait
    forever. Ray Train V2's own PlacementGroupCleaner reaches the controller through the state API
    and fails here ("Found multiple active Ray instances" when several Rays share a host).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = pg.creator_actor_id and pg.creator_actor_id != b"\xff" * len(pg.creator_actor_id)  # nil id: made by a driver
        if (by_actor and pg.creator_actor_dead and not pg.is_detached and pg.creator_job_id.hex() == job
                and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


@contextlib.contextmanager
def reaping_orphaned_placement_groups(every_s: float = 5.0, drain_s: float = 30.0) -> Iterator[None]:
    """While the block runs (Tuner.fit), release orphaned placement groups every few seconds, and for
    `drain_s` after it (the last trials' controllers die after fit() returns; a stage that trains
    next, as in the pipeline, needs their CPUs)."""
    done, until = threading.Event(), [float("inf")]

    def loop() -> None:
        import ray

        while time.monotonic() < until[0]:
            done.wait(every_s if not done.is_set() else 2.0)
            if not ray.is_initialized():
                return
            try:
                if n := release_orphaned_placement_groups():
                    log.info("released %d placement group(s) of stopped trials", n)
            except Exception as e:  # noqa: BLE001 - never let the reaper end the search (or Ray's shutdown)
                log.debug("placement group reaper: %s", e)
                if done.is_set():
                    return

    thread = threading.Thread(target=loop, name="newsray-pg-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        until[0] = time.monotonic() + drain_s
        done.set()


def trial_dirname(trial: Any) -> str:
    """Trial directories (and Train runs) are named by trial id."""
    return str(trial.trial_id)


def val_objective(cfg: Config, model_ref: str, out_dir: Path) -> float:
    """f1 (news) or accuracy (agnews) of `model_ref` on the validation split, by newsray.evaluate (Ray Data)."""
    from newsray.evaluate.pipeline import evaluate

    scored = cfg.model_copy(deep=True)
    scored.eval.limit = cfg.tune.objective_limit
    return float(evaluate(scored, model_ref, out_dir, split="val").aggregates[EVAL_KEYS[cfg.tune.objective]])


def _val_objective_task(cfg_json: dict[str, Any], adapter_dir: str, out_dir: str, run_id: str) -> float:
    """val_objective in its own task, the evaluation's MLflow run nested under the trial's run."""
    import mlflow

    from newsray.tracking import tracking_uri, use_store

    cfg = Config.model_validate(cfg_json)
    use_store(tracking_uri(cfg))
    with mlflow.start_run(run_id=run_id):
        return val_objective(cfg, adapter_dir, Path(out_dir))


def _remote_val_objective(cfg: Config, adapter_dir: Path, out_dir: Path, run_id: str) -> float:
    """Outside the trial's placement group (which holds only the trial driver), Ray Data gets the cluster's CPUs."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0)(_val_objective_task).options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(cfg.model_dump(mode="json"), str(adapter_dir), str(out_dir), run_id))


def _child_run(client: Any, spec: dict[str, Any], trial_id: str, params: dict[str, Any], cfg: Config) -> str:
    """The trial's nested MLflow run: found again when a resumed search restarts the trial, else created."""
    from mlflow.entities import Param

    found = client.search_runs([spec["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{spec['parent_run_id']}' "
                                                                      f"and tags.`newsray.trial_id` = '{trial_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "newsray.trial_restarts", str(int(found[0].data.tags.get("newsray.trial_restarts", "0")) + 1))
        return run_id
    run = client.create_run(spec["experiment_id"], run_name=f"{spec['name']}-{trial_id}", tags={
        "mlflow.parentRunId": spec["parent_run_id"], "newsray.stage": "tune-trial", "newsray.trial_id": trial_id,
        "newsray.task": cfg.data.task, "newsray.model": cfg.model.name, "newsray.search": spec["name"]})
    flat = {f"trial.{k}": v for k, v in params.items()} | {"trial.lora_alpha": cfg.lora.alpha} | cfg.flat()
    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    client.log_text(run.info.run_id, cfg.to_yaml(), "config.yaml")
    return run.info.run_id


def _log_adapter(client: Any, run_id: str, adapter_dir: Path) -> None:
    """The adapter directory (without optimizer state) as the child run's adapter/ artifacts."""
    from newsray.train.checkpoint import TRAINING_STATE_FILE

    for p in sorted(adapter_dir.iterdir()):
        if p.name != TRAINING_STATE_FILE:
            (client.log_artifacts if p.is_dir() else client.log_artifact)(run_id, str(p), f"adapter/{p.name}" if p.is_dir() else "adapter")


def run_trial(params: dict[str, Any], spec: dict[str, Any], data: Any) -> None:
    """The Tune function trainable: one Ray Train run with the sampled values, its objective, its MLflow run."""
    import ray.tune
    from mlflow import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    from newsray.train.driver import build_trainer, worker_config

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(Config.model_validate(spec["cfg"]), params, spec["train_storage"], trial_id)
    client = MlflowClient(tracking_uri=spec["tracking_uri"])
    run_id = _child_run(client, spec, trial_id, params, cfg)
    try:
        key, _, value = (spec.get("fail") or "").partition("=")
        if key and str(params.get(key)) == value:
            raise RuntimeError(f"{FAIL_ENV}: trial with {key}={value} fails on purpose")
        loop_config = worker_config(cfg, data, mlflow={"tracking_uri": spec["tracking_uri"], "run_id": run_id})
        result = build_trainer(cfg, loop_config, callbacks=[TuneReportCallback()]).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"trial {trial_id} finished without a checkpoint")
        adapter_dir = Path(result.checkpoint.path)
        last = result.metrics or {}
        final = {"step": int(last.get("step", cfg.train.max_steps)), "val_loss": float(last.get("val_loss", math.nan)),
                 "loss": float(last.get("loss", math.nan))}
        if cfg.tune.objective != "val_loss":
            final[cfg.tune.objective] = _remote_val_objective(cfg, adapter_dir, Path(spec["eval_dir"]) / trial_id, run_id)
        if not math.isfinite(final[cfg.tune.objective]):
            raise RuntimeError(f"trial {trial_id}: the objective {cfg.tune.objective} is {final[cfg.tune.objective]} (diverged?)")
        _log_adapter(client, run_id, adapter_dir)
        client.log_batch(run_id, metrics=[_metric(f"final_{k}", v) for k, v in final.items() if k != "step"])
        client.set_tag(run_id, "newsray.trial_status", "completed")
        client.set_terminated(run_id, "FINISHED")
        ray.tune.report({**final, "adapter_dir": str(adapter_dir), "mlflow_run_id": run_id, "trial_completed": 1})
    except Exception as e:
        client.set_tag(run_id, "newsray.trial_status", "failed")
        client.set_tag(run_id, "newsray.error", (str(e).strip().splitlines() or [type(e).__name__])[0][:500])
        client.set_terminated(run_id, "FAILED")
        raise


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)
