"""Checkpoint discovery on local disk and in object storage (a real S3 server: moto_server), via pyarrow.fs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from localcluster import free_port

from newsray.train.checkpoint import (
    ADAPTER_FILES,
    CONFIG_FILE,
    STATE_FILE,
    TRAINING_STATE_FILE,
    latest_complete,
    local_copy,
)

FILES = (*ADAPTER_FILES, CONFIG_FILE, "tokenizer_config.json", TRAINING_STATE_FILE)


def write_checkpoint(root: Path, step: int, complete: bool = True) -> None:
    d = root / f"checkpoint_{step:06d}"
    d.mkdir(parents=True)
    (d / STATE_FILE).write_text(json.dumps({"global_step": step}))
    for f in FILES if complete else FILES[:2]:
        (d / f).write_text(f"{f} {step}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real moto_server on a free loopback port, a bucket, and the AWS_* env pyarrow reads."""
    import pyarrow.fs

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        mp = pytest.MonkeyPatch()
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        fs = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir("ckpts")
        yield fs
        mp.undo()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_latest_complete_on_local_disk(tmp_path):
    assert latest_complete(tmp_path / "missing") is None
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 6, complete=False)  # a crash while it was being written
    assert latest_complete(tmp_path) == tmp_path.resolve() / "checkpoint_000004"
    assert local_copy(tmp_path / "checkpoint_000004", tmp_path / "unused") == tmp_path / "checkpoint_000004"


def test_latest_complete_in_s3_and_its_local_copy(s3, tmp_path):
    import pyarrow.fs

    local = tmp_path / "run"
    write_checkpoint(local, 2)
    write_checkpoint(local, 10)  # newest by global_step, not by name order alone
    write_checkpoint(local, 12, complete=False)
    pyarrow.fs.copy_files(str(local), "ckpts/run", source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=s3)
    assert latest_complete("s3://ckpts/run") == "s3://ckpts/run/checkpoint_000010"
    assert latest_complete("s3://ckpts/nothing-here") is None
    got = local_copy("s3://ckpts/run/checkpoint_000010", tmp_path / "dl")
    assert sorted(p.name for p in got.iterdir()) == sorted([*FILES, STATE_FILE])
    assert json.loads((got / STATE_FILE).read_text())["global_step"] == 10
