"""What every task provides, and where the data lives."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsray.config import DataConfig
from newsray.errors import DataError

DATA_ENV = "NEWSRAY_DATA_DIR"
DATA_SOURCES = (
    "the news set is the MIT-licensed hand-annotated newsletter data of the published study "
    "(news/news_train_data.jsonl, news/news_test_data.jsonl); AG News is Xiang Zhang's "
    "ag_news_csv (agnews/test.csv, research/non-commercial use)"
)


@dataclass(frozen=True)
class Example:
    """One item: the user turn of the prompt, the gold assistant answer, and metadata."""

    id: str
    user: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (what inference sends)."""
        return [{"role": "user", "content": self.user}]


@dataclass
class Splits:
    """Train / validation / test examples of one task."""

    train: list[Example]
    val: list[Example]
    test: list[Example]


def candidate_roots(cfg: DataConfig) -> list[Path]:
    """Where the data may live, in the order they are tried."""
    if cfg.root:
        return [Path(cfg.root)]
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).expanduser().resolve()]
    repo = Path(__file__).resolve().parents[2]
    found = [Path.cwd() / "data", Path.cwd().parent / "shared" / "data", repo / "data", repo.parent / "shared" / "data"]
    return list(dict.fromkeys(p.resolve() for p in found))


def find_file(cfg: DataConfig, relative: str) -> Path:
    """Resolve a data file against the data root, or fail with where we looked and what to do."""
    rel = Path(relative)
    if rel.is_absolute():
        if rel.is_file():
            return rel
        looked = [rel]
    else:
        looked = [root / rel for root in candidate_roots(cfg)]
        for p in looked:
            if p.is_file():
                return p
    raise DataError(
        f"data file {relative} not found (looked in: {', '.join(str(p) for p in looked)}); "
        f"set data.root in the config, pass data.root=DIR, or export {DATA_ENV}=DIR "
        f"to the directory holding news/ and agnews/ ({DATA_SOURCES})."
    )


def sha256_file(path: Path) -> str:
    """Content hash of a data file (logged with every run)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Task(ABC):
    """A task: its files, its examples, and how to read a model's answer."""

    name: str
    #: the fields a new item must carry (`newsray analyze` reads them; make_user_prompt takes them)
    input_fields: tuple[str, ...] = ()
    #: the published prompt/answer format is the same for training, evaluation and serving
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    @abstractmethod
    def files(self) -> dict[str, Path]:
        """Data files by role (train, test), resolved."""

    @abstractmethod
    def validate(self, all_errors: bool = False) -> list[str]:
        """Check every record; raise DataError on the first bad one, or return all if `all_errors`."""

    @abstractmethod
    def load(self) -> Splits:
        """Validated train / val / test examples."""

    @abstractmethod
    def stats(self, splits: Splits) -> dict[str, Any]:
        """Split sizes, label/score distributions, date ranges, leakage."""

    @abstractmethod
    def make_user_prompt(self, **fields: str) -> str:
        """The user turn for new input (serving), formatted exactly like the training data."""

    def data_hashes(self) -> dict[str, str]:
        """sha256 of each data file, by role."""
        return {role: sha256_file(p) for role, p in self.files().items()}
