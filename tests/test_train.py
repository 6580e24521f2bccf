"""Real Ray Train runs on the embedded SmolLM2-135M: hf end to end via the CLI, DDP, Unsloth on CPU, recovery."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest

from newsray.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    """One in-process Ray (2 CPUs) for this module, shut down afterwards."""
    from newsray.raycluster import init_ray

    ray = init_ray(load_config(None, ["ray.num_cpus=2", "ray.object_store_memory_mb=256"]))
    yield ray
    ray.shutdown()


def overrides(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    """A tiny agnews run (short prompts = fast steps) writing only under tmp_path."""
    return ["data.task=agnews", f"data.root={data_dir}", "model.max_seq_length=512", "train.warmup_steps=0",
            "train.learning_rate=1e-3", "train.lr_scheduler=constant", "train.per_device_batch_size=2",
            f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}", *extra]


def state_of(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "trainer_state.json").read_text())


def assert_loads(adapter_dir: Path) -> None:
    """The adapter directory loads onto the base model (what evaluate/serve do) and was trained."""
    import torch
    from peft import PeftModel

    from newsray.config import Config
    from newsray.models import load_model

    cfg = Config.model_validate(__import__("yaml").safe_load((adapter_dir / "newsray_config.yaml").read_text()))
    model = PeftModel.from_pretrained(load_model(cfg.model), str(adapter_dir))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # lora_B starts at zero: it moved
    assert isinstance(model(torch.tensor([[1, 2, 3]])).logits, torch.Tensor)


def test_hf_end_to_end_via_cli(ray_cluster, tmp_path, data_dir, embedded_model):
    import mlflow
    from typer.testing import CliRunner

    from newsray.cli import app
    from newsray.train.checkpoint import is_adapter_dir

    # 3 rows: 2 train (= one batch, repeated every step) + 1 val.
    args = overrides(tmp_path, data_dir, "data.train_rows=[100,103]", "data.val_fraction=0.34", "train.max_steps=5",
                     "train.checkpoint_every_steps=2", "train.keep_checkpoints=2", "train.precision=fp32")
    res = CliRunner().invoke(app, ["train", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    found = dict(re.findall(r"^(adapter dir|adapter uri|mlflow run|ray run): (\S+)$", res.output, re.MULTILINE))
    adapter_dir, run_id = Path(found["adapter dir"]), found["mlflow run"]
    assert found["adapter uri"] == f"runs:/{run_id}/adapter"

    assert is_adapter_dir(adapter_dir) and (adapter_dir / "training_state.pt").is_file()
    assert "<|im_start|>" in (adapter_dir / "chat_template.jinja").read_text()
    state = state_of(adapter_dir)
    assert state["global_step"] == 5 and state["backend"] == "hf" and state["data_position"] == {"epoch": 5, "batch_in_epoch": 0}
    losses = [h["loss"] for h in state["log_history"]]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses  # the same batch every step: it must be learned
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    kept = sorted(p.name for p in adapter_dir.parent.glob("checkpoint_0*") if p.is_dir())
    val = {h["step"]: h["val_loss"] for h in state["log_history"] if "val_loss" in h}
    assert sorted(val) == [2, 4, 5]  # a checkpoint every 2 steps and at the end, each with its val_loss
    assert kept == sorted(f"checkpoint_{s:06d}" for s in {*sorted(val, key=val.get)[:2], 5})  # the 2 best by val_loss + the latest

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["newsray.stage"] == "train"
    assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["derived.max_steps"] == "5"
    assert "newsray.data_sha256.csv" in run.data.tags and run.data.tags["newsray.git_commit"]
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert [m.value for m in history] == pytest.approx(losses)
    assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == {2, 4, 5}
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "tokens_per_s"))
    artifacts = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/newsray_config.yaml"} <= artifacts
    assert "adapter/training_state.pt" not in artifacts
    local = Path(mlflow.artifacts.download_artifacts(found["adapter uri"], dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"))
    assert is_adapter_dir(local)
    assert_loads(local)


def test_two_workers_ddp(ray_cluster, tmp_path, data_dir, embedded_model):
    from newsray.train import train

    cfg = load_config(None, overrides(tmp_path, data_dir, "data.train_rows=[100,104]", "train.max_steps=2",
                                      "train.per_device_batch_size=1", "train.num_workers=2", "train.cpus_per_worker=0.9"))
    result = train(cfg)
    state = state_of(result.adapter_dir)
    assert state["global_step"] == 2 and state["world_size"] == 2
    assert state["micro_batches_per_epoch"] == 2  # 4 examples / (1 per rank x 2 ranks)
    assert all(math.isfinite(h["loss"]) for h in state["log_history"])
    assert result.metrics["global_step"] == 2 and math.isfinite(result.metrics["final_loss"])


def test_unsloth_backend_on_cpu(ray_cluster, tmp_path, data_dir, embedded_model):
    from newsray.train import train

    cfg = load_config(None, overrides(tmp_path, data_dir, "data.train_rows=[100,102]", "train.max_steps=3",
                                      "train.backend=unsloth", "train.precision=bf16"))
    result = train(cfg)
    state = state_of(result.adapter_dir)
    assert state["backend"] == "unsloth" and "unsloth" in state["versions"]
    losses = [h["loss"] for h in state["log_history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert_loads(result.adapter_dir)


# Killed after step 3: Ray has registered the step-2 checkpoint and step 3 runs twice. Killed right
# after step 2's report: the controller may not have registered that checkpoint yet, so the restarted
# worker must find it in the run directory (checkpoint.latest_complete); no step runs twice.
@pytest.mark.parametrize(("kill_after", "metric_steps"), [(3, [1, 2, 3, 3, 4, 5]), (2, [1, 2, 3, 4, 5])])
def test_killed_worker_resumes_from_the_latest_checkpoint(kill_after, metric_steps, ray_cluster, tmp_path, data_dir,
                                                          embedded_model, monkeypatch):
    import mlflow

    from newsray.train import train
    from newsray.train.loop import KILL_ENV

    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(KILL_ENV, f"{kill_after}:{marker}")  # rank 0 SIGKILLs itself once, after that step
    cfg = load_config(None, overrides(tmp_path, data_dir, "data.train_rows=[100,104]", "train.max_steps=5",
                                      "train.checkpoint_every_steps=2", "train.max_failures=1"))
    result = train(cfg)
    assert marker.is_file(), "the worker was never killed"
    state = state_of(result.adapter_dir)
    assert state["global_step"] == 5 and state["resumed_from_steps"] == [2]
    assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4, 5]  # history restored from the checkpoint
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    steps = [m.step for m in sorted(client.get_metric_history(result.mlflow_run_id, "loss"), key=lambda m: (m.timestamp, m.step))]
    assert steps == metric_steps  # only the steps after the step-2 checkpoint run twice
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")] == [2]
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert_loads(result.adapter_dir)


def test_failed_run_is_marked_failed_keeps_its_checkpoint_and_resumes_on_purpose(ray_cluster, tmp_path, data_dir,
                                                                                 embedded_model, monkeypatch):
    import mlflow

    from newsray.train import train
    from newsray.train.loop import KILL_ENV

    monkeypatch.setenv(KILL_ENV, f"1:{tmp_path / 'killed.txt'}")
    args = overrides(tmp_path, data_dir, "data.train_rows=[100,102]", "train.max_steps=2", "train.checkpoint_every_steps=1",
                     "train.max_failures=0", "train.run_name=resumable")
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        train(load_config(None, args))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (failed,) = client.search_runs([client.get_experiment_by_name("newsray-agnews").experiment_id])
    assert failed.info.status == "FAILED"
    checkpoint = Path(failed.data.tags["newsray.latest_checkpoint"])
    assert checkpoint.name == "checkpoint_000001" and state_of(checkpoint)["global_step"] == 1
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "loss")] == [1]  # logged before the crash

    result = train(load_config(None, args + ["train.resume=true"]))  # the marker exists now: no second kill
    state = state_of(result.adapter_dir)
    assert state["global_step"] == 2 and state["resumed_from_steps"] == [1] and result.run_name == "resumable"
    assert client.get_run(result.mlflow_run_id).data.tags["newsray.resumed"] == "true"


def test_a_user_error_in_a_worker_ends_the_run_at_once_not_retried(ray_cluster, tmp_path, data_dir, embedded_model):
    """Resuming into another LoRA shape is found in the worker (it reads the checkpoint): one sentence after one attempt,
    although train.max_failures allows three more."""
    from ray._private.state import actors  # the GCS actor table, dead actors included (no dashboard in this Ray)

    from newsray.errors import ConfigError
    from newsray.train import train

    args = overrides(tmp_path, data_dir, "data.train_rows=[100,102]", "train.max_steps=1", "train.checkpoint_every_steps=1",
                     "lora.r=4", "lora.alpha=4", "train.run_name=reshaped")
    train(load_config(None, args))

    def workers_started() -> int:
        return sum(1 for a in actors().values() if a["ActorClassName"] == "RayTrainWorker")

    before = workers_started()
    with pytest.raises(ConfigError, match=r"another LoRA shape \(lora\.r=4 there, 8 here; lora\.alpha=4 there, 8 here\)"):
        train(load_config(None, args + ["lora.r=8", "lora.alpha=8", "train.resume=true", "train.max_steps=2", "train.max_failures=3"]))
    assert workers_started() - before == 1  # one attempt: Ray Train did not retry the user's error


def test_the_best_validation_checkpoint_survives_later_worse_ones(ray_cluster, tmp_path, data_dir, embedded_model):
    """keep_checkpoints=1 with a checkpoint every step and a learning rate that makes validation worse after the start:
    the best val_loss checkpoint is kept beside the latest (Ray's score-ordered keep), and MLflow names it."""
    import mlflow

    from newsray.train import train

    result = train(load_config(None, overrides(tmp_path, data_dir, "data.train_rows=[100,106]", "data.val_fraction=0.34",
                                               "train.max_steps=4", "train.checkpoint_every_steps=1", "train.keep_checkpoints=1",
                                               "train.learning_rate=0.05", "train.run_name=best-kept")))
    val = {h["step"]: h["val_loss"] for h in state_of(result.adapter_dir)["log_history"] if "val_loss" in h}
    best = min(val, key=val.get)
    assert sorted(val) == [1, 2, 3, 4] and best != 4, f"validation did not get worse after its best step: {val}"
    kept = sorted(p.name for p in (tmp_path / "ray" / "best-kept").glob("checkpoint_*") if p.is_dir())
    assert kept == [f"checkpoint_{best:06d}", "checkpoint_000004"]
    tags = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(result.mlflow_run_id).data.tags
    assert tags["newsray.best_checkpoint"].endswith(f"checkpoint_{best:06d}")
    assert float(tags["newsray.best_val_loss"]) == pytest.approx(val[best], rel=1e-4)


def test_workers_must_fit_in_the_in_process_ray(ray_cluster, tmp_path, data_dir, embedded_model):
    from newsray.errors import ConfigError
    from newsray.train import train

    cfg = load_config(None, overrides(tmp_path, data_dir, "data.train_rows=[100,106]", "train.num_workers=3"))
    with pytest.raises(ConfigError, match="needs 3 CPU but the Ray cluster has 2"):
        train(cfg)


def test_same_loop_in_process_without_ray(tmp_path, data_dir, embedded_model):
    from newsray.train.checkpoint import is_adapter_dir
    from newsray.train.driver import train_in_process

    cfg = load_config(None, overrides(tmp_path, data_dir, "data.train_rows=[100,102]", "train.max_steps=2",
                                      "train.precision=fp32"))
    last, adapter_dir = train_in_process(cfg, tmp_path / "local")
    assert last["step"] == 2 and math.isfinite(last["loss"]) and is_adapter_dir(adapter_dir)
    assert state_of(adapter_dir)["global_step"] == 2
