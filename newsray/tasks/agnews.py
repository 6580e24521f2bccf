"""The AG News task: topic classification with the published prompt and label names."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path
from typing import Any

from newsray.errors import DataError
from newsray.tasks.base import Example, Metric, Splits, Task, find_file

CSV_FILE = "agnews/test.csv"
LABELS = ("World", "Sports", "Business", "Sci/Tech")
PROMPT_TEMPLATE = "Classify this news: {text}\nAnswer:"
_LABEL_RE = re.compile("|".join(re.escape(label) for label in LABELS), re.IGNORECASE)


def clean(text: str) -> str:
    """Undo the corpus escapes: `\\n` (backslash + n) is a newline, per the data's readme."""
    return text.replace("\\n", "\n")


def parse_label(text: str) -> str | None:
    """The first label name in a model's answer (case-insensitive), or None (counted as unmatched)."""
    m = _LABEL_RE.search(text)
    if not m:
        return None
    return next(label for label in LABELS if label.lower() == m.group(0).lower())


def read_rows(path: Path, all_errors: bool = False) -> tuple[list[Example], list[str]]:
    """Every CSV row as an Example (id = row index); errors as `file:line: reason`."""
    examples, errors = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row_idx, row in enumerate(reader):
            lineno = reader.line_num  # physical line where the row ends (no header)
            problem = None
            if len(row) != 3:
                problem = f"expected 3 columns (class, title, description), got {len(row)}"
            elif row[0].strip() not in {"1", "2", "3", "4"}:
                problem = f"class: expected 1-4, got {row[0]!r}"
            elif not (row[1].strip() or row[2].strip()):
                problem = "title/description: both empty"
            if problem:
                msg = f"{path}:{lineno}: {problem}"
                if not all_errors:
                    raise DataError(msg)
                errors.append(msg)
                continue
            label = LABELS[int(row[0]) - 1]
            text = f"{clean(row[1]).strip()} {clean(row[2]).strip()}".strip()
            examples.append(Example(id=str(row_idx), user=PROMPT_TEMPLATE.format(text=text), answer=label,
                                    meta={"row": row_idx, "label": label, "title": clean(row[1])}))
    return examples, errors


class AgNewsTask(Task):
    """AG News (World, Sports, Business, Sci/Tech) from the official CSV."""

    name = "agnews"
    title = "AG News"
    input_fields = ("title", "description")  # the AG News CSV's columns (Serve's /v1/classify sends title + content)
    suite = "labels"
    labels = LABELS
    serve_kind = "classify"
    objectives = ("val_loss", "accuracy")
    metrics = (Metric("accuracy", "Accuracy", "pct", "high", "headline"), Metric("macro_f1", "Macro F1", "f3", "high", "headline"),
               Metric("unmatched", "Unmatched answers", "int", "low", "summary"))

    def files(self) -> dict[str, Path]:
        # One CSV serves both splits (the published train split is not available here).
        path = find_file(self.cfg, self.cfg.test_file or self.cfg.train_file or CSV_FILE)
        return {"csv": path}

    def validate(self, all_errors: bool = False) -> list[str]:
        return read_rows(self.files()["csv"], all_errors)[1]

    def load(self) -> Splits:
        rows = read_rows(self.files()["csv"])[0]
        (a, b), (c, d) = self.cfg.train_rows, self.cfg.test_rows
        if max(b, d) > len(rows):
            raise DataError(f"{self.files()['csv']}: data.train_rows/test_rows reach row {max(b, d)} but the file has {len(rows)} rows.")
        train, test = rows[a:b], rows[c:d]
        val: list[Example] = []
        if self.cfg.val_fraction > 0:
            n_val = max(1, round(len(train) * self.cfg.val_fraction))
            train, val = train[:-n_val], train[-n_val:]
        return Splits(train=train, val=val, test=test)

    def stats(self, splits: Splits) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.name, "splits": {}}
        for name, exs in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            if exs:
                out["splits"][name] = {
                    "n": len(exs),
                    "rows": [int(exs[0].id), int(exs[-1].id) + 1],
                    "labels": dict(sorted(Counter(e.answer for e in exs).items())),
                    "mean_prompt_chars": sum(len(e.user) for e in exs) / len(exs),
                }
        seen = {e.meta["title"].strip().lower() for e in splits.train + splits.val}
        out["leakage"] = [f"title {e.meta['title'].strip()!r} (row {e.id}) is in both splits"
                          for e in splits.test if e.meta["title"].strip().lower() in seen]
        return out

    def make_user_prompt(self, **fields: str) -> str:
        body = fields.get("content") or fields.get("description") or ""
        text = fields.get("text") or f"{fields.get('title', '')} {body}".strip()
        return PROMPT_TEMPLATE.format(text=text)

    def request_fields(self, ex: Example) -> dict[str, str]:
        return {"title": str(ex.meta.get("title") or ex.user)}

    def train_selection(self) -> list[int] | None:
        return list(self.cfg.train_rows)  # one CSV holds both splits: the rows are the training set

    @classmethod
    def parse_output(cls, text: str) -> dict[str, Any]:
        return {"predicted": parse_label(text)}

    @classmethod
    def answer_of(cls, parsed: dict[str, Any]) -> tuple[Any, bool]:
        return parsed.get("predicted"), parsed.get("predicted") is not None

    @classmethod
    def answer_schema(cls) -> None:
        return None

    @classmethod
    def grammar(cls) -> tuple[str, int]:
        """Exactly one label name (no reserve: a label needs no closing)."""
        from llguidance import LLMatcher

        return LLMatcher.grammar_from_regex("(" + "|".join(re.escape(label) for label in LABELS) + ")"), 0

    @classmethod
    def score(cls, examples: list[Example], rows: list[dict[str, Any]]) -> tuple[list, list, dict, dict]:
        import json

        from newsray.evaluate.metrics import classification_metrics

        preds = [{"id": i, "gold": ex.answer, "predicted": json.loads(row["parsed"])["predicted"], "output": row["output"]}
                 for i, (ex, row) in enumerate(zip(examples, rows))]
        refs = [{"id": i, "gold": ex.answer} for i, ex in enumerate(examples)]
        per = {"correct": [float(p["predicted"] == p["gold"]) for p in preds]}
        return preds, refs, per, classification_metrics([p["gold"] for p in preds], [p["predicted"] for p in preds])

    @classmethod
    def reference_id(cls, ref: Any) -> Any:
        return ref.get("id")

    @classmethod
    def claims(cls, prediction: Any) -> bool:
        return isinstance(prediction, dict) and "gold" in prediction

    @classmethod
    def serve_answer(cls, text: str) -> dict[str, Any] | None:
        label = parse_label(text)
        return {"label": label} if label else None

    @classmethod
    def same_reference(cls, a: Any, b: Any) -> bool:
        return bool(a["gold"] == b["gold"])
