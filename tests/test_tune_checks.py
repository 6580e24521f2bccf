"""Bad search input is one ConfigError sentence before any trial; the search space and searchers from the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from newsray.config import load_config
from newsray.errors import ConfigError


def tiny(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    """A 6-row AG News search (4 train, 2 val) writing only under tmp_path."""
    return ["data.task=agnews", f"data.root={data_dir}", "data.train_rows=[100,106]", "data.val_fraction=0.34",
            "model.max_seq_length=512", f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}",
            "tune.max_steps_per_trial=2", "tune.asha_grace_period=2", *extra]


def refused(tmp_path: Path, data_dir: Path, *extra: str) -> str:
    """tune() must refuse before any trial: nothing under storage_path, no MLflow store."""
    from newsray.tune import tune

    with pytest.raises(ConfigError) as err:
        tune(load_config(None, tiny(tmp_path, data_dir, *extra)))
    assert not any((tmp_path / "ray").glob("*")), "a search directory was created"
    assert not (tmp_path / "runs" / "mlflow.db").exists(), "an MLflow run was started"
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


@pytest.mark.parametrize(("extra", "expected"), [
    (["tune.learning_rate=[1e-3,1e-4]"], "tune.learning_rate: [0.001, 0.0001] is not a range"),
    (["tune.learning_rate=[0,1e-3]"], "0 < low < high"),
    (["tune.lora_r=[]"], "tune.lora_r is empty"),
    (["tune.batch_size=[]"], "tune.batch_size is empty"),
    (["tune.lora_r=[8,0]"], "tune.lora_r: 0 is not a positive integer"),
    (["tune.objective=f1"], "tune.objective=f1: the agnews task has no f1 objective; use one of val_loss, accuracy."),
    (["data.val_fraction=0"], "data.val_fraction is 0"),
    (["tune.asha_grace_period=5"], "tune.asha_grace_period=5 exceeds tune.max_steps_per_trial=2"),
    (["tune.warmup_steps=[-1]"], "tune.warmup_steps: -1 is negative"),
])
def test_contradictory_space_refused_before_any_trial(tmp_path, data_dir, extra, expected):
    assert expected in refused(tmp_path, data_dir, *extra)


def test_batch_larger_than_training_data_refused(tmp_path, data_dir, embedded_model):
    msg = refused(tmp_path, data_dir, "tune.batch_size=[2,8]")  # 6 rows - 2 val = 4 training examples
    assert "tune.batch_size: 8 x train.num_workers=1 examples per step" in msg
    assert "only 4 usable training examples" in msg and "(keep [2])" in msg


def test_objective_the_task_does_not_have(tmp_path, data_dir):
    from newsray.search import objective_of

    with pytest.raises(ConfigError, match=r"the news task has no accuracy objective; use one of val_loss, f1\."):
        objective_of(load_config(None, ["tune.objective=accuracy"]))
    assert objective_of(load_config(None, ["tune.objective=f1"])) == ("f1", "max")
    assert objective_of(load_config(None, ["data.task=agnews", "tune.objective=accuracy"])) == ("accuracy", "max")
    assert objective_of(load_config(None, [])) == ("val_loss", "min")


def test_num_samples_zero_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'tune.num_samples=0': tune.num_samples: Input should be greater than 0"):
        load_config(None, ["tune.num_samples=0"])


def test_resume_without_a_search_and_too_many_concurrent_trials(tmp_path, data_dir):
    from newsray.search import check_resources
    from newsray.tune import tune

    with pytest.raises(ConfigError, match=r"--resume: no unfinished agnews search under"):
        tune(load_config(None, tiny(tmp_path, data_dir)), resume=True)
    with pytest.raises(ConfigError, match=r"tune.name=nope: there is no search to resume"):
        tune(load_config(None, tiny(tmp_path, data_dir, "tune.name=nope")), resume=True)
    cfg = load_config(None, ["tune.max_concurrent_trials=2", "tune.cpus_per_trial=1.5"])
    with pytest.raises(ConfigError, match=r"= 3.1 CPUs but the Ray cluster has 2"):
        check_resources(cfg, 2.0, in_process=True)
    check_resources(cfg, 2.0, in_process=False)  # a cluster may autoscale: no error
    check_resources(load_config(None, ["tune.cpus_per_trial=1.5"]), 2.0, in_process=True)


def test_search_space_and_searchers_from_the_config():
    from ray import tune as rt
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from newsray.search import (
        expected_trials,
        grid_learning_rates,
        param_space,
        scheduler,
        searcher,
        trial_config,
    )

    cfg = load_config(None, ["tune.learning_rate=[1e-4,1e-2]", "tune.lora_r=[8,16]", "tune.batch_size=[2,4]", "tune.alpha_rule=double",
                             "tune.warmup_steps=[0,5]", "tune.max_steps_per_trial=12", "tune.asha_grace_period=3"])
    space = param_space(cfg)
    assert isinstance(space["learning_rate"], rt.search.sample.Float) and space["learning_rate"].lower == 1e-4
    assert space["lora_r"].categories == [8, 16] and space["warmup_steps"].categories == [0, 5]
    assert expected_trials(cfg) == 8
    t = trial_config(cfg, {"learning_rate": 3e-4, "lora_r": 16, "batch_size": 4, "warmup_steps": 5}, "/tmp/x", "t1")
    assert (t.lora.r, t.lora.alpha, t.train.per_device_batch_size, t.train.warmup_steps) == (16, 32, 4, 5)
    assert (t.train.max_steps, t.train.checkpoint_every_steps, t.train.run_name, t.train.learning_rate) == (12, 3, "t1", 3e-4)
    grid = load_config(None, ["tune.search_alg=grid", "tune.learning_rate=[1e-4,1e-2]", "tune.grid_lr_points=3", "tune.lora_r=[8,16]"])
    assert grid_learning_rates(grid) == [1e-4, 1e-3, 1e-2]
    assert param_space(grid)["learning_rate"] == {"grid_search": [1e-4, 1e-3, 1e-2]} and expected_trials(grid) == 3 * 2 * 2
    assert isinstance(searcher(grid, "val_loss", "min"), BasicVariantGenerator)
    opt = searcher(load_config(None, ["tune.search_alg=optuna", "tune.max_concurrent_trials=2"]), "val_loss", "min")
    assert isinstance(opt, ConcurrencyLimiter) and opt.max_concurrent == 2 and type(opt.searcher).__name__ == "OptunaSearch"
    asha = scheduler(cfg)
    assert (asha.metric, asha._time_attr, asha._max_t) == ("val_loss", "step", 13)  # one past the last step: see scheduler()


def test_cli_prints_one_line_without_traceback(tmp_path, data_dir):
    cli = str(Path(sys.executable).with_name("newsray"))
    r = subprocess.run([cli, "tune", *tiny(tmp_path, data_dir, "tune.objective=f1")], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error: tune.objective=f1: the agnews task has no f1 objective" in r.stderr


def test_a_corrupt_search_state_is_one_sentence(tmp_path, data_dir, capsys):
    from newsray.tune import SEARCH_FILE, tune

    storage = tmp_path / "ray"
    (storage / "broken").mkdir(parents=True)
    (storage / "broken" / SEARCH_FILE).write_text('{"name": "broken", "status": "runn')  # cut off mid-write
    with pytest.raises(ConfigError, match=r"newsray_tune.json cannot be read \(JSONDecodeError") as info:
        tune(load_config(None, tiny(tmp_path, data_dir, "tune.name=broken")), resume=True)
    assert "\n" not in str(info.value) and "start a new search" in str(info.value)
    with pytest.raises(ConfigError, match=r"--resume: no unfinished agnews search under"):  # unnamed: skipped with a warning
        tune(load_config(None, tiny(tmp_path, data_dir)), resume=True)
    assert "skipped" in capsys.readouterr().err
