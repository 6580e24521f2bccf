"""Connecting to Ray: a cluster when an address is given, else an in-process Ray sized by the config."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.console import warn

# Passed to every Ray worker so they behave like the driver (threads, telemetry, offline hub).
# The AWS_* ones reach object storage (train.storage_path=s3://...; AWS_ENDPOINT_URL for an
# S3-compatible server such as cluster/local.sh's); MLFLOW_S3_ENDPOINT_URL the same for MLflow.
_PROPAGATED_ENV = ("OMP_WAIT_POLICY", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE",
                   "HF_HOME", "NEWSRAY_CACHE_DIR", "NEWSRAY_DATA_DIR", "TINKER_BASE_URL", "TINKER_API_KEY",
                   "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL",
                   "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for Ray workers/actors: the driver's relevant ones plus `extra`."""
    env = {k: os.environ[k] for k in _PROPAGATED_ENV if os.environ.get(k)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env | (extra or {})


def ensure_auth_token() -> None:
    """With token auth, make sure Ray finds a token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token); create the default file (mode 0600) if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _job_env_covers(env_vars: dict[str, str]) -> bool:
    """Inside a submitted Ray job: does the job's own runtime_env already set every one of `env_vars`?"""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the entrypoint
    if not raw:
        return False
    try:
        job_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return False
    return all(job_vars.get(k) == v for k, v in env_vars.items())


def init_ray(cfg: Config, extra_env: dict[str, str] | None = None, stage: str | None = None) -> Any:
    """`ray.init` once: `ray.address` / $RAY_ADDRESS if set, else in-process with the configured size.

    Ray's auth mode is always chosen explicitly (ray.auth_mode, or $RAY_AUTH_MODE if the user set
    it): an in-process Ray and a `ray start` head must agree, or the CLI and Jobs SDK are refused.
    With `stage` (evaluate, serve, ...), `preflight_placement(cfg, stage)` runs once Ray is up.
    """
    # Before `import ray`: Ray reads its auth mode when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)
    if os.environ["RAY_AUTH_MODE"] == "token":
        ensure_auth_token()
    import ray

    if ray.is_initialized():
        if stage:
            preflight_placement(cfg, stage)
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env(extra_env)}
    if address:
        # Inside a submitted job the job's runtime_env (working_dir, py_modules, env_vars) applies
        # too: combine it with ours instead of refusing the overlap.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        if _job_env_covers(runtime_env["env_vars"]):
            # A submitted job whose runtime_env already carries these variables: no second, merged
            # runtime_env (a new environment for every actor of the job to set up).
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # In-process: the local raylet and every worker it starts inherit this process's environment,
        # so the variables go there instead of into a runtime_env. A runtime_env, even of env_vars
        # only, keeps Ray from using its prestarted workers: an actor took 2.2 s to start instead of
        # 0.8 s (bench/ray_overhead.py, docs/BENCHMARKS.md), and a training run starts several.
        os.environ.update(runtime_env["env_vars"])
        # address="local": a new in-process Ray even when a `ray start` cluster runs on this
        # machine (a bare ray.init() would attach to the newest one and refuse num_cpus).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory_mb * 1024 * 1024,
                 include_dashboard=cfg.ray.include_dashboard, log_to_driver=True)
    if stage:
        preflight_placement(cfg, stage)
    return ray


# --------------------------------------------------------------------------------------
# What the cluster can place: one check before a stage starts any work (never a hang)

AUTOSCALING_ENV = "NEWSRAY_AUTOSCALING"  # "1": the cluster grows on demand; placement problems only warn
_EPS = 1e-9


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes (ray.nodes() entries); Ray must be initialised."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _demands(cfg: Config, stage: str) -> list[tuple[str, list[dict[str, float]]]]:
    """(what the config asks for, its resource bundles) per part of `stage`; each group must be placeable at once."""
    t, e, s, tu = cfg.train, cfg.eval, cfg.serve, cfg.tune
    train = (f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g}" + (" + 1 GPU each" if t.use_gpu else ""),
             [{"CPU": t.cpus_per_worker, "GPU": 1.0 if t.use_gpu else 0.0}] * t.num_workers)
    trial = (f"one tune trial (tune.driver_cpus={tu.driver_cpus:g} + train.num_workers={t.num_workers} sharing tune.cpus_per_trial="
             f"{tu.cpus_per_trial:g}" + (f", tune.gpus_per_trial={tu.gpus_per_trial:g}" if tu.gpus_per_trial else "") + ")",
             [{"CPU": tu.driver_cpus}] + [{"CPU": tu.cpus_per_trial / t.num_workers, "GPU": tu.gpus_per_trial / t.num_workers}] * t.num_workers)
    evaluate = (f"eval.num_actors={e.num_actors} x eval.cpus_per_actor={e.cpus_per_actor:g}" + (f" + eval.gpus_per_actor={e.gpus_per_actor:g}" if e.gpus_per_actor else ""),
                [{"CPU": e.cpus_per_actor, "GPU": e.gpus_per_actor}] * e.num_actors)
    serve = (f"serve.num_replicas={s.num_replicas} x serve.cpus_per_replica={s.cpus_per_replica:g}" + (f" + serve.gpus_per_replica={s.gpus_per_replica:g}" if s.gpus_per_replica else ""),
             [{"CPU": s.cpus_per_replica, "GPU": s.gpus_per_replica}] * s.num_replicas)
    by_stage = {"train": [train], "tune": [trial], "evaluate": [evaluate], "serve": [serve],
                "pipeline": [trial, train, evaluate] + ([serve] if cfg.pipeline.serve else [])}
    if stage not in by_stage:
        raise ValueError(f"unknown stage {stage!r}")
    return by_stage[stage]


def _place(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> int:
    """How many of `bundles` fit at once on nodes of these total resources (first fit, biggest first)."""
    free = [dict(n) for n in nodes]
    placed = 0
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
        for f in free:
            if all(f.get(k, 0.0) + _EPS >= v for k, v in b.items() if v > 0):
                for k, v in b.items():
                    f[k] = f.get(k, 0.0) - v
                placed += 1
                break
    return placed


def _sees_everywhere(path: Path, nodes: list[dict[str, Any]], timeout_s: float = 120.0) -> list[str]:
    """Node ids (of `nodes`) on which a marker written here under `path` cannot be read back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not nodes:
        return []
    token = secrets.token_hex(8)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / f".newsray-shared-{token}"
    marker.write_text(token)
    try:
        def sees(p: str, want: str) -> bool:
            f = Path(p)
            return f.is_file() and f.read_text() == want

        probe = ray.remote(num_cpus=0, max_retries=0)(sees)
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker), token): n["NodeID"]
                for n in nodes}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        blind = [refs[r] for r in refs if r not in ready]
        for r in ready:
            try:
                if not ray.get(r):
                    blind.append(refs[r])
            except Exception:  # noqa: BLE001 - a node that cannot run the probe does not see it either
                blind.append(refs[r])
        return blind
    finally:
        marker.unlink(missing_ok=True)


def check_shared_services(cfg: Config, stage: str, nodes: list[dict[str, Any]]) -> None:
    """On a cluster of more than one node: MLflow must be a server and train.storage_path storage every node sees."""
    from newsray.errors import ConfigError
    from newsray.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith(("sqlite:", "file:", "/", ".")):
        raise ConfigError(f"the MLflow tracking URI {uri} is a file on this machine but the Ray cluster has {len(nodes)} nodes; "
                          "run an MLflow server and set MLFLOW_TRACKING_URI (or tracking.uri) to its http:// address.")
    storage = cfg.train.storage_path
    if stage in ("train", "tune", "pipeline") and ("://" not in storage or storage.startswith("file://")):
        # Not probed on this process's own node: it sees its own files, and a task there that shares
        # a submitted job's runtime env can take the job's working dir with it when its worker exits.
        import ray

        here = ray.get_runtime_context().get_node_id()
        blind = _sees_everywhere(Path(storage.removeprefix("file://")).resolve(), [n for n in nodes if n["NodeID"] != here])
        if blind:
            raise ConfigError(f"train.storage_path={storage} is a local path that {len(blind)} of the cluster's {len(nodes)} nodes "
                              f"cannot see (node {blind[0][:12]}); use object storage (s3://bucket/path) or a filesystem mounted on every node.")


def preflight_placement(cfg: Config, stage: str) -> None:
    """One ConfigError sentence, before any work, if `stage` (train, tune, evaluate, serve, pipeline) asks the
    connected Ray cluster for what it can never place, or relies on files only one node has.

    Checked against the nodes' total resources: a bundle no node holds (a replica, actor or Train
    worker bigger than every node), GPUs on a cluster without any, or more bundles than the nodes can
    hold at once (Train workers, actors and replicas all start together, or wait forever). With
    $NEWSRAY_AUTOSCALING=1 (a cluster that adds nodes on demand) placement problems only warn.
    """
    
    from newsray.errors import ConfigError

    nodes = alive_nodes()
    if len(nodes) > 1:
        check_shared_services(cfg, stage, nodes)
    totals = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in nodes]
    gpus = sum(n.get("GPU", 0.0) for n in totals)
    shape = ", ".join(f"{n.get('CPU', 0.0):g} CPU" + (f"/{n['GPU']:g} GPU" if n.get("GPU") else "") for n in totals)
    for what, bundles in _demands(cfg, stage):
        if not bundles:
            continue
        msg = None
        if any(b.get("GPU", 0.0) > 0 for b in bundles) and gpus == 0:
            msg = f"{what} asks for GPUs but the Ray cluster has none (nodes: {shape}); set the GPU fields to 0 or add GPU nodes."
        elif (big := next((b for b in bundles if _place([b], totals) == 0), None)) is not None:
            need = ", ".join(f"{v:g} {k}" for k, v in big.items() if v > 0)
            msg = f"{what}: no node of the Ray cluster can hold one of them ({need}; nodes: {shape}); lower the per-unit resources or add bigger nodes."
        elif (n := _place(bundles, totals)) < len(bundles):
            msg = f"{what}: the Ray cluster can place only {n} of the {len(bundles)} at once (nodes: {shape}); lower the count or the per-unit resources, or add nodes."
        if msg:
            if os.environ.get(AUTOSCALING_ENV) == "1":
                warn(f"{msg} (waiting for the autoscaler: ${AUTOSCALING_ENV}=1)")
            else:
                raise ConfigError(msg)
