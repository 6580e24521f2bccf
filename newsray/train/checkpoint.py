"""The adapter directory contract, written at every checkpoint and read back on resume.

An adapter directory holds: the PEFT files (adapter_config.json, adapter_model.safetensors),
the tokenizer files with the chat template used in training, `newsray_config.yaml` (the run's
resolved Config) and `trainer_state.json` (step, epoch, data position, losses). A checkpoint
adds `training_state.pt` (optimizer, scheduler, RNG) for resumption; loaders ignore it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from newsray.config import Config

CONFIG_FILE = "newsray_config.yaml"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class TrainerState:
    """Where training stands: optimizer steps done, epoch, data position and the loss history."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    micro_batches_seen: int = 0  # per rank; with the seed this fixes the data position
    micro_batches_per_epoch: int = 0
    world_size: int = 1
    seed: int = 0
    run_name: str = ""
    backend: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, peft, unsloth ...
    resumed_from_steps: list[int] = field(default_factory=list)
    log_history: list[dict[str, float]] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)  # at this checkpoint: node id, pid, LoRA digest per rank

    def data_position(self) -> dict[str, int]:
        """(epoch index, micro-batch within that epoch) of the next batch on each rank."""
        per = max(1, self.micro_batches_per_epoch)
        return {"epoch": self.micro_batches_seen // per, "batch_in_epoch": self.micro_batches_seen % per}

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"data_position": self.data_position()}, indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> TrainerState:
        raw = json.loads((Path(directory) / STATE_FILE).read_text())
        raw.pop("data_position", None)
        return cls(**raw)


def save_adapter_dir(directory: Path, model: Any, tokenizer: Any, cfg: Config, state: TrainerState) -> None:
    """Write the adapter directory contract (PEFT files, tokenizer, config, trainer state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / CONFIG_FILE).write_text(cfg.to_yaml())
    (directory / STATE_FILE).write_text(state.to_json())


def save_training_state(directory: Path, optimizer: Any, scheduler: Any, state: TrainerState, scaler: Any = None) -> None:
    """Optimizer, scheduler, grad scaler and RNG states for an exact resume."""
    import numpy as np
    import torch

    payload = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "global_step": state.global_step, "micro_batches_seen": state.micro_batches_seen,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    torch.save(payload, Path(directory) / TRAINING_STATE_FILE)


def check_adapter_shape(model: Any, directory: Path) -> None:
    """A checkpoint resumes only into the LoRA shape it was trained with: a ConfigError naming the difference."""
    from newsray.errors import ConfigError

    saved = json.loads((Path(directory) / "adapter_config.json").read_text())
    current = model.peft_config["default"]
    diffs = [f"lora.{name}={saved.get(key)!r} there, {norm(getattr(current, key))!r} here"
             for name, key, norm in (("r", "r", int), ("alpha", "lora_alpha", int),
                                     ("target_modules", "target_modules", lambda v: sorted(v or [])))
             if (sorted(saved.get(key) or []) if name == "target_modules" else saved.get(key)) != norm(getattr(current, key))]
    if diffs:
        raise ConfigError(f"the checkpoint {directory} was trained with another LoRA shape ({'; '.join(diffs)}): "
                          "resume with its settings, or start a new run (another train.run_name, train.resume=false).")


def load_adapter_weights(model: Any, directory: Path) -> None:
    """Copy saved LoRA weights into an already-built PEFT model (same config)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_adapter_shape(model, directory)
    weights = load_file(str(Path(directory) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: unexpected keys {unexpected[:3]}")


def restore_training_state(directory: Path, optimizer: Any, scheduler: Any, restore_rng: bool, scaler: Any = None) -> dict[str, Any]:
    """Load optimizer/scheduler(/scaler) state, and the RNG state on the rank that saved it."""
    import numpy as np
    import torch

    payload = torch.load(Path(directory) / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        rng = payload["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return payload


def is_adapter_dir(directory: Path) -> bool:
    """Whether `directory` satisfies the adapter directory contract."""
    d = Path(directory)
    return all((d / f).is_file() for f in (*ADAPTER_FILES, CONFIG_FILE, STATE_FILE, "tokenizer_config.json"))


def _storage_fs(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local directory or a storage URI (s3://..., gs://..., file://...)."""
    import pyarrow.fs

    loc = str(location)
    if "://" in loc:
        return pyarrow.fs.FileSystem.from_uri(loc)
    return pyarrow.fs.LocalFileSystem(), str(Path(loc).resolve())


def _join(location: str | Path, name: str) -> str:
    return f"{str(location).rstrip('/')}/{name}"


def latest_complete(run_dir: str | Path) -> str | Path | None:
    """The newest complete checkpoint_* directory (adapter + training state) of a run directory.

    `run_dir` is a local directory (returns a Path) or a storage URI such as s3://bucket/run (returns
    the checkpoint's URI; read it with `local_copy`). Read through pyarrow.fs, as Ray Train writes it.
    """
    import pyarrow.fs

    fs, base = _storage_fs(run_dir)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    best: tuple[int, str] | None = None
    need = (*ADAPTER_FILES, CONFIG_FILE, STATE_FILE, "tokenizer_config.json", TRAINING_STATE_FILE)
    for info in infos:
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = fs.get_file_info([f"{info.path}/{f}" for f in need])
        if any(f.type != pyarrow.fs.FileType.File for f in files):
            continue
        with fs.open_input_stream(f"{info.path}/{STATE_FILE}") as f:
            step = int(json.loads(f.read())["global_step"])
        if best is None or step > best[0]:
            best = (step, info.base_name)
    if best is None:
        return None
    return Path(base) / best[1] if isinstance(fs, pyarrow.fs.LocalFileSystem) and "://" not in str(run_dir) else _join(run_dir, best[1])


def local_copy(location: str | Path, target: Path) -> Path:
    """A checkpoint directory on local disk: itself if it is local, else downloaded into `target`."""
    import pyarrow.fs

    if "://" not in str(location) or str(location).startswith("file://"):
        return Path(str(location).removeprefix("file://"))
    fs, path = _storage_fs(location)
    target.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return target
