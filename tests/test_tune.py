"""A real search on the embedded SmolLM2: interrupted with Ctrl-C (SIGINT) in a `newsray tune` subprocess after
its first trial, resumed with `newsray tune --resume`; a failing trial, nested MLflow runs, the trial table, the
registered version and the champion alias (and a worse result that does not move it)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newsray.config import load_config

pytestmark = pytest.mark.slow

NAME = "search"


def args(tmp_path: Path, data_dir: Path) -> list[str]:
    """A 3-trial grid over LoRA rank on 6 AG News rows (4 train, 2 val), 2 steps each; the r=8 trial fails (FAIL_ENV)."""
    return ["data.task=agnews", f"data.root={data_dir}", "data.train_rows=[100,106]", "data.val_fraction=0.34",
            "model.max_seq_length=512", "train.warmup_steps=0", "train.lr_scheduler=constant", "train.precision=fp32",
            f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}", "ray.num_cpus=2",
            "ray.object_store_memory_mb=256", f"tune.name={NAME}", "tune.search_alg=grid", "tune.grid_lr_points=1",
            "tune.learning_rate=[1e-3,2e-3]", "tune.lora_r=[4,8,16]", "tune.batch_size=[2]", "tune.max_steps_per_trial=2",
            "tune.asha_grace_period=2", "tune.cpus_per_trial=1.5", "tune.alpha_rule=equal"]


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(d for d in exp.glob("*_0*") if d.is_dir()) if exp.is_dir() else []


def interrupt_after_first_trial(tmp_path: Path, data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start `newsray tune`, wait until trial 1 has ended and trial 2 started (one at a time), send SIGINT."""
    exp = tmp_path / "ray" / NAME
    cli = str(Path(sys.executable).with_name("newsray"))
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([cli, "tune", *args(tmp_path, data_dir)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 600
        while len(trial_dirs(exp)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial did not finish in 10 minutes"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, (tmp_path / "first.log").read_text(), "")


def test_interrupted_search_resumes_and_registers_the_champion(tmp_path, data_dir, embedded_model, monkeypatch):
    import mlflow
    import ray
    from typer.testing import CliRunner

    from newsray.cli import app
    from newsray.generation import resolve_model_ref
    from newsray.registry import register
    from newsray.search import FAIL_ENV
    from newsray.train.checkpoint import is_adapter_dir

    env = {**os.environ, FAIL_ENV: "lora_r=8", "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"}
    first = interrupt_after_first_trial(tmp_path, data_dir, env)
    assert first.returncode == 2, first.stdout[-3000:]
    assert f"error: search {NAME} stopped with" in first.stdout and f"--resume tune.name={NAME}" in first.stdout
    exp = tmp_path / "ray" / NAME
    state = json.loads((exp / "newsray_tune.json").read_text())
    assert state["status"] == "interrupted"
    t1 = trial_dirs(exp)[0]
    t1_results = (t1 / "result.json").read_text()
    t1_ckpts = {p.name: p.stat().st_mtime_ns for p in (exp / "train_runs" / t1.name).iterdir()}
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)  # not a registry URI an earlier test set globally
    parent_id = state["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"

    monkeypatch.setenv(FAIL_ENV, "lora_r=8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # this test's store, whatever earlier tests in this process left behind
    try:
        res = CliRunner().invoke(app, ["tune", "--resume", *args(tmp_path, data_dir)], catch_exceptions=False)
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    assert "registered: models:/newsray-agnews/1" in res.output and "champion: version 1 (moved: there was no champion yet)" in res.output

    # Trial 1 was not run again: same Tune results, same checkpoints, one MLflow curve of 2 steps.
    assert (t1 / "result.json").read_text() == t1_results
    assert {p.name: p.stat().st_mtime_ns for p in (exp / "train_runs" / t1.name).iterdir()} == t1_ckpts
    rows = list(csv.DictReader((tmp_path / "runs" / "tune" / NAME / "trials.csv").read_text().splitlines()))
    by_r = {int(r["lora_r"]): r for r in rows}
    assert sorted(by_r) == [4, 8, 16]
    assert by_r[4]["status"] == "completed" and by_r[8]["status"] == "failed"
    assert by_r[16]["status"] in ("completed", "early_stopped")  # ran after the failure: the search went on
    assert float(by_r[4]["val_loss"]) > 0 and by_r[4]["steps"] == "2"

    # MLflow: one parent (resumed, finished) with one nested child per trial.
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["newsray.resumed"] == "1"
    assert parent.data.tags["newsray.stage"] == "tune" and parent.data.metrics["n_trials"] == 3
    assert {a.path for a in client.list_artifacts(parent_id, "tune")} == {"tune/trials.csv", "tune/trials.md"}
    children = {r.data.tags["newsray.trial_id"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert set(children) == {r["trial_id"] for r in rows}
    c4, c8 = children[by_r[4]["trial_id"]], children[by_r[8]["trial_id"]]
    assert c4.info.status == "FINISHED" and c4.data.params["trial.lora_r"] == "4" and c4.data.params["lora.r"] == "4"
    assert "newsray.trial_restarts" not in c4.data.tags
    assert [m.step for m in client.get_metric_history(c4.info.run_id, "loss")] == [1, 2]
    assert c8.info.status == "FAILED" and "fails on purpose" in c8.data.tags["newsray.error"]
    assert "adapter" not in {a.path for a in client.list_artifacts(c8.info.run_id)}

    # The registry: version 1 = the best completed trial's adapter; models:/...@champion resolves for evaluate/serve.
    done = {r: row for r, row in by_r.items() if row["status"] == "completed"}
    best_r = min(done, key=lambda r: float(done[r]["val_loss"]))
    v1 = client.get_model_version_by_alias("newsray-agnews", "champion")
    assert str(v1.version) == "1" and v1.run_id == done[best_r]["mlflow_run_id"]
    assert v1.tags["newsray.objective"] == "val_loss" and float(v1.tags["newsray.objective_value"]) == pytest.approx(float(done[best_r]["val_loss"]))
    cfg = load_config(None, args(tmp_path, data_dir))
    spec = resolve_model_ref("models:/newsray-agnews@champion", cfg)
    assert is_adapter_dir(spec.adapter_dir) and json.loads((spec.adapter_dir / "adapter_config.json").read_text())["r"] == best_r
    assert spec.model.name == cfg.model.name

    # A later, worse result is registered as version 2 but does not take the alias.
    worse = register(cfg, v1.source, v1.run_id, "val_loss", float(v1.tags["newsray.objective_value"]) + 1.0,
                     v1.tags["newsray.objective_basis"], source="a worse search")
    assert (worse.version, worse.champion_moved) == ("2", False)
    assert str(client.get_model_version_by_alias("newsray-agnews", "champion").version) == "1"
    assert json.loads((exp / "newsray_tune.json").read_text())["status"] == "finished"


def test_placement_group_of_a_killed_controller_is_released(data_dir):
    """What ASHA does to a trial: the actor that made a placement group dies; the group must not keep its CPUs."""
    import ray

    from newsray.raycluster import init_ray
    from newsray.search import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> str:
            from ray.util.placement_group import placement_group

            self.pg = placement_group([{"CPU": 1.5}])
            ray.get(self.pg.ready(), timeout=60)
            return self.pg.id.hex()

    def free_cpus(expected: float) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if abs(ray.available_resources().get("CPU", 0.0) - expected) < 1e-6:
                return True
            time.sleep(0.5)
        return False

    init_ray(load_config(None, ["ray.num_cpus=2", "ray.object_store_memory_mb=256"]))
    try:
        driver_pg = ray.util.placement_group([{"CPU": 0.25}])  # made by the driver (like Tune's trial groups): kept
        ray.get(driver_pg.ready(), timeout=60)
        ctl = Controller.remote()
        ray.get(ctl.reserve.remote(), timeout=120)
        assert free_cpus(0.25)
        ray.kill(ctl)
        time.sleep(3)
        assert free_cpus(0.25), "the killed actor's placement group was released without help: the reaper is moot"
        assert release_orphaned_placement_groups() == 1
        assert free_cpus(1.75)
        assert release_orphaned_placement_groups() == 0
    finally:
        ray.shutdown()
