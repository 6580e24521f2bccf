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


@dataclass(frozen=True)
class Metric:
    """One aggregate a task reports: how tables, plots, the CLI and the pipeline show it."""

    key: str  # the aggregates.json key
    label: str  # its row label in comparison tables
    fmt: str  # pct | f3 | f2 | int
    better: str | None  # high | low | None (no direction)
    level: str = "table"  # headline (pipeline summary, CLI, tables) | summary (CLI, tables) | table (tables only)
    heatmap: tuple[str, str] | None = None  # (column label, colour scale unit | mae | r2) of the summary heatmap


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
    """A task: its files, its examples, how to read and score a model's answer, and how it is shown and served.

    The facts that need no data config are class attributes or classmethods, so callers that hold only the
    task's name (a loaded model, an evaluation directory) reach them through `newsray.tasks.task_type(name)`.
    """

    name: str
    #: the task's name in sentences ("news", "AG News")
    title: str
    #: the fields a new item must carry (`newsray analyze` reads them; make_user_prompt takes them)
    input_fields: tuple[str, ...] = ()
    #: the metric suite of evaluate/ that scores and compares its answers: fields (a JSON record) | labels (a class name)
    suite: str
    #: a generation stops at the end of its first closed top-level JSON object (the answer is one)
    json_stop: bool = False
    #: the closed set of answers of a classification task (constrained decoding picks one of them), else ()
    labels: tuple[str, ...] = ()
    #: the Serve endpoint kind that answers it (POST /v1/<serve_kind>)
    serve_kind: str
    #: the aggregates tables, plots, the CLI and the pipeline show, in table order
    metrics: tuple[Metric, ...] = ()
    #: the tune.objective values it can be tuned on (directions: newsray.registry.MODES)
    objectives: tuple[str, ...] = ("val_loss",)

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

    @classmethod
    def metric_keys(cls, *levels: str) -> tuple[str, ...]:
        """The keys of `metrics` at the given levels (all when none given), in table order."""
        return tuple(m.key for m in cls.metrics if not levels or m.level in levels)

    @classmethod
    def summary_keys(cls) -> tuple[str, ...]:
        """What `newsray evaluate` prints: the headline and summary metrics, then the row count and throughput."""
        return cls.metric_keys("headline", "summary") + ("n", "examples_per_s")

    @classmethod
    @abstractmethod
    def parse_output(cls, text: str) -> dict[str, Any]:
        """The parse rule: one model continuation -> the prediction record evaluate writes."""

    @classmethod
    @abstractmethod
    def answer_of(cls, parsed: dict[str, Any]) -> tuple[Any, bool]:
        """(the structured answer, valid?) of a parse_output record (what `newsray analyze` writes)."""

    @classmethod
    @abstractmethod
    def answer_schema(cls) -> dict[str, Any] | None:
        """The JSON Schema constrained decoding holds a JSON answer to (None for a label task)."""

    @classmethod
    @abstractmethod
    def grammar(cls) -> tuple[str, int]:
        """(llguidance grammar, budget reserve in tokens) of the answer, for eval.constrained / serve.constrained."""

    @classmethod
    @abstractmethod
    def score(cls, examples: list[Example], rows: list[dict[str, Any]]) -> tuple[list, list, dict, dict]:
        """(prediction records, reference records, per-example metrics, aggregates) of parsed generation rows."""

    @classmethod
    @abstractmethod
    def reference_id(cls, ref: Any) -> Any:
        """The id of one reference record of an evaluation directory (as evaluate/sources.py loads it)."""

    @classmethod
    @abstractmethod
    def same_reference(cls, a: Any, b: Any) -> bool:
        """Whether two evaluations' reference records at one position are the same example."""

    @classmethod
    def serve_answer(cls, text: str) -> dict[str, Any] | None:
        """The answer fields of a Serve response for a model output, or None when the output is invalid."""
        answer, valid = cls.answer_of(cls.parse_output(text))
        return answer if valid else None

    @classmethod
    @abstractmethod
    def claims(cls, prediction: Any) -> bool:
        """Whether a prediction record of an evaluation without eval_info.json is of this task (its shape)."""

    @abstractmethod
    def request_fields(self, ex: Example) -> dict[str, str]:
        """The JSON body of a Serve request (POST /v1/<serve_kind>) for a test example."""

    def train_selection(self) -> list[int] | None:
        """Which rows of the training file training reads (part of an objective's basis), or None for all of them."""
        return None

    def data_hashes(self) -> dict[str, str]:
        """sha256 of each data file, by role."""
        return {role: sha256_file(p) for role, p in self.files().items()}
