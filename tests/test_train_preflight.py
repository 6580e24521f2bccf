"""Bad training input is refused on the driver, before Ray or any worker starts; sharding is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from newsray.config import load_config
from newsray.errors import ConfigError, DataError


def cfg_for(tmp_path: Path, data_dir: Path, *overrides: str):
    """A tiny agnews run writing only under tmp_path."""
    return load_config(None, ["data.task=agnews", f"data.root={data_dir}", "data.train_rows=[100,104]",
                              "model.max_seq_length=512", "train.max_steps=2", "train.per_device_batch_size=2",
                              f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}", *overrides])


def refused(cfg) -> str:
    """Run train(); it must raise a NewsrayError before Ray is started, and return its message."""
    import ray

    from newsray.train import train

    assert not ray.is_initialized()
    with pytest.raises((ConfigError, DataError)) as info:
        train(cfg)
    assert not ray.is_initialized(), "Ray was started before the input was checked"
    return str(info.value)


def test_batch_larger_than_the_data(tmp_path, data_dir, embedded_model):
    msg = refused(cfg_for(tmp_path, data_dir, "train.per_device_batch_size=3", "train.num_workers=2"))
    assert "train.per_device_batch_size=3 x train.num_workers=2 = 6" in msg and "only 4 usable" in msg and "test.csv" in msg


def test_unknown_backend_and_tinker_without_a_key(tmp_path, data_dir, monkeypatch):
    with pytest.raises(ConfigError, match="train.backend"):
        cfg_for(tmp_path, data_dir, "train.backend=deepspeed-magic")
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    assert "train.backend=tinker needs an API key" in refused(cfg_for(tmp_path, data_dir, "train.backend=tinker"))


@pytest.mark.parametrize("override, words", [
    ("model.load_in_4bit=true", "model.load_in_4bit"),
    ("train.optimizer=adamw_8bit", "adamw_torch on CPU"),
    ("train.optimizer=paged_adamw_8bit", "bitsandbytes GPU optimizer"),
    ("train.precision=fp16", "fp16 is for GPUs"),
])
def test_gpu_only_settings_are_refused_on_cpu(tmp_path, data_dir, override, words):
    assert words in refused(cfg_for(tmp_path, data_dir, override))


def test_deepspeed_on_cpu_is_refused(tmp_path, data_dir):
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert "train.deepspeed" in refused(cfg_for(tmp_path, data_dir, f"train.deepspeed={ds}"))
    msg = refused(cfg_for(tmp_path, data_dir, f"train.deepspeed={ds}", "train.backend=unsloth"))
    assert "backend=hf only" in msg or "needs Unsloth" in msg


def test_unwritable_storage_path(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    msg = refused(cfg_for(tmp_path, data_dir, f"train.storage_path={blocker / 'ray'}"))
    assert msg.startswith("train.storage_path: cannot write to") and str(blocker) in msg


def test_existing_run_name_needs_resume(tmp_path, data_dir):
    (tmp_path / "ray" / "my-run").mkdir(parents=True)
    assert "already exists" in refused(cfg_for(tmp_path, data_dir, "train.run_name=my-run"))
    assert "no run 'other'" in refused(cfg_for(tmp_path, data_dir, "train.run_name=other", "train.resume=true"))
    assert "letters, digits" in refused(cfg_for(tmp_path, data_dir, "train.run_name=../escape"))


def test_broken_data_line_gives_the_task_error(tmp_path, data_dir, embedded_model):
    lines = (data_dir / "news" / "news_train_data.jsonl").read_text().splitlines()[:3]
    lines[1] = lines[1][:-15]
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"data.root={data_dir}", f"data.train_file={bad}", "train.max_steps=1",
                             f"train.storage_path={tmp_path / 'ray'}", f"tracking.run_dir={tmp_path / 'runs'}"])
    msg = refused(cfg)
    assert msg.startswith(f"{bad}:2: ")


def test_shards_are_disjoint_deterministic_and_reshuffled_per_epoch():
    from newsray.train.data import ShardedBatches

    rows = [{"input_ids": [i, i], "attention_mask": [1, 1], "labels": [-100, i]} for i in range(10)]
    ranks = [ShardedBatches(rows, batch_size=2, rank=r, world_size=2, seed=7, pad_id=0) for r in range(2)]
    assert ranks[0].per_epoch == 2  # 10 // (2*2); the tail of 2 is dropped so both ranks step together
    epoch0 = [set(b.indices(0) + b.indices(1)) for b in ranks]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 8
    again = ShardedBatches(rows, batch_size=2, rank=0, world_size=2, seed=7, pad_id=0)
    assert [again.indices(g) for g in range(4)] == [ranks[0].indices(g) for g in range(4)]
    assert ranks[0].indices(0) + ranks[0].indices(1) != ranks[0].indices(2) + ranks[0].indices(3)  # epoch 1 reshuffled
    batch = ranks[0].batch(0)
    assert batch["input_ids"].shape == (2, 2) and (batch["labels"][:, 0] == -100).all()


def test_length_grouped_batches_pad_little_and_keep_ranks_in_step():
    import random

    from newsray.train.data import ShardedBatches

    rnd = random.Random(0)
    rows = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": [-100] * (n - 1) + [1]}
            for n in (rnd.randint(5, 400) for _ in range(403))]

    def padding(b: ShardedBatches, g: int) -> int:
        lengths = [len(rows[i]["input_ids"]) for i in b.indices(g)]
        return max(lengths) * len(lengths) - sum(lengths)

    plain = [ShardedBatches(rows, 4, r, 2, seed=7, pad_id=0) for r in range(2)]
    grouped = [ShardedBatches(rows, 4, r, 2, seed=7, pad_id=0, group_by_length=True) for r in range(2)]
    per_epoch = grouped[0].per_epoch
    assert per_epoch == plain[0].per_epoch == 50
    for epoch in range(2):
        gs = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [i for b in grouped for g in gs for i in b.indices(g)]
        assert len(seen) == len(set(seen)) == 400  # each example once per epoch, across both ranks
        assert set(seen) == {i for b in plain for g in gs for i in b.indices(g)}  # the same examples as ungrouped
        # both ranks' micro-batch g come from one sorted global batch: their lengths interleave
        for g in gs:
            lo = [len(rows[i]["input_ids"]) for i in grouped[0].indices(g)]
            hi = [len(rows[i]["input_ids"]) for i in grouped[1].indices(g)]
            assert max(lo + hi) - min(lo + hi) < 60
        pad_grouped = sum(padding(b, g) for b in grouped for g in gs)
        assert pad_grouped * 10 < sum(padding(b, g) for b in plain for g in gs)
    lengths = [max(len(rows[i]["input_ids"]) for i in grouped[0].indices(g)) for g in range(per_epoch)]
    assert lengths != sorted(lengths, reverse=True) and lengths != sorted(lengths)  # batches in random order
    again = ShardedBatches(rows, 4, 0, 2, seed=7, pad_id=0, group_by_length=True)
    assert [again.indices(g) for g in range(60)] == [grouped[0].indices(g) for g in range(60)]  # resumable


def test_completion_loss_equals_the_full_logits_loss(embedded_model):
    import torch

    from newsray.models import load_model
    from newsray.train.loss import completion_loss

    model = load_model(load_config(None, []).model)
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:], mask[2, 9:] = 0, 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # a prompt
    labels[0, 10:12] = -100  # and a gap inside a completion
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        full, sliced = model(**batch).loss, completion_loss(model, batch)
        assert completion_loss(model, batch, sliced_logits=False) == full
    assert torch.allclose(full, sliced, atol=1e-5), (float(full), float(sliced))


def test_cli_prints_one_line_without_traceback(tmp_path, data_dir, embedded_model):
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("newsray"))
    r = subprocess.run([cli, "train", "data.task=agnews", f"data.root={data_dir}", "data.train_rows=[100,104]",
                        "train.per_device_batch_size=8", f"train.storage_path={tmp_path / 'ray'}",
                        f"tracking.run_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: train.per_device_batch_size=8 x train.num_workers=1 = 8 examples per step" in " ".join(r.stderr.split())


def test_a_worker_group_that_never_starts_ends_in_one_sentence():
    """Ray Train's controller gives up after train.worker_start_retries (not Ray's endless default):
    its startup-timeout error, as fit() raises it, becomes one sentence with the resume command."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from newsray.errors import NewsrayError
    from newsray.train.driver import _start_timeout_error, build_trainer

    cfg = load_config(None, ["train.num_workers=2", "train.run_name=node-gone", "train.worker_start_retries=3"])
    assert build_trainer(cfg, {}).run_config.failure_config.controller_failure_limit == 3
    err = _start_timeout_error(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), cfg, "s3://b/node-gone/checkpoint_000002")
    assert isinstance(err, NewsrayError)
    assert "could not start 2 worker(s)" in str(err) and "in 4 tries" in str(err)
    assert "s3://b/node-gone/checkpoint_000002" in str(err) and "train.resume=true train.run_name=node-gone" in str(err)
    assert _start_timeout_error(RuntimeError("a bug"), cfg, None) is None
