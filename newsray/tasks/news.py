"""The news task: newsletter item -> JSON metadata (relevance, summary, insights, companies)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from newsray.errors import DataError
from newsray.tasks.base import Example, Metric, Splits, Task, find_file

TRAIN_FILE = "news/news_train_data.jsonl"
TEST_FILE = "news/news_test_data.jsonl"

# The published prompt, byte for byte (it asks for action_items: that is how the data was
# made; kept as published for comparability). Every prompt in the shipped data matches it.
PROMPT_TEMPLATE = (
    "Analyze this newsletter item:\n\nTitle: {title}\nContent: {content}\n\n"
    "Provide a JSON response with:\n"
    "- relevance_score (1-10): How relevant is this to tech professionals?\n"
    "- summary: One-sentence summary\n"
    "- key_insights: List of main takeaways\n"
    "- action_items: Recommended next steps"
)


class NewsAnswer(BaseModel):
    """The assistant's JSON answer; the schema of training data, evaluation and the API."""

    model_config = ConfigDict(extra="ignore")

    relevance_score: Annotated[StrictInt, Field(ge=1, le=10)]
    summary: StrictStr
    key_insights: list[StrictStr]
    company_names: list[StrictStr]


#: the answer's fields, in the order of the schema and of the training answers
FIELDS: tuple[str, ...] = tuple(NewsAnswer.model_fields)
_SCHEMA = NewsAnswer.model_json_schema()
_PROPS: dict[str, dict[str, Any]] = _SCHEMA["properties"]
#: what a summary of a sponsored item says (the sponsored-ad metrics and the data stats look for it)
SPONSORED_MARKER = "sponsored ad"

# Bounds of the constrained-decoding schema (eval.constrained): about twice the largest value in
# the annotated data (summary <= 92 chars, <= 10 insights of <= 38 chars, <= 9 companies of
# <= 46 chars), so that a constrained answer always fits a 256-token budget and terminates.
SCHEMA_BOUNDS = {"summary_chars": 200, "max_insights": 12, "insight_chars": 80, "max_companies": 12, "company_chars": 60}
# Which bound applies to which field: strings -> maxLength; lists -> (maxItems, the items' maxLength).
_STRING_BOUND = {"summary": "summary_chars"}
_LIST_BOUNDS = {"key_insights": ("max_insights", "insight_chars"), "company_names": ("max_companies", "company_chars")}
# Whitespace allowed between JSON tokens under constraints: enough for the indent-2 layout of the
# training answers ("\n    " before a list item), bounded so an untrained model cannot loop on it.
SCHEMA_WHITESPACE = r"[ \n]{0,8}"


def _bounded(name: str, prop: dict[str, Any]) -> dict[str, Any]:
    """One property of NewsAnswer's pydantic JSON Schema with the decoding bounds above."""
    b = SCHEMA_BOUNDS
    if prop["type"] == "integer":
        return {"type": "integer", "minimum": prop["minimum"], "maximum": prop["maximum"]}
    if prop["type"] == "string":
        return {"type": "string", "maxLength": b[_STRING_BOUND[name]]}
    items, chars = _LIST_BOUNDS[name]
    return {"type": "array", "items": {"type": prop["items"]["type"], "maxLength": b[chars]}, "maxItems": b[items]}


def answer_json_schema() -> dict[str, Any]:
    """JSON schema of NewsAnswer with the bounds above, in field order (for constrained decoding)."""
    return {
        "type": "object",
        "properties": {name: _bounded(name, prop) for name, prop in _PROPS.items()},
        "required": list(_SCHEMA["required"]),
        "additionalProperties": False,
        "x-guidance": {"whitespace_pattern": SCHEMA_WHITESPACE, "item_separator": ",", "key_separator": ":"},
    }


#: the fields a valid prediction/reference record must carry (evaluate/scoring.py checks them), in the
#: published records' layout: the score, the lists, then the strings
REQUIRED_FIELDS: tuple[str, ...] = tuple(sorted(_SCHEMA["required"], key=lambda n: ("integer", "array", "string").index(_PROPS[n]["type"])))


def _empty(prop: dict[str, Any]) -> Any:
    """A property's value in the invalid record: 0 for the score, empty strings and lists."""
    return {"integer": 0, "string": "", "array": []}[prop["type"]]


def invalid_prediction() -> dict[str, Any]:
    """The record of an unparseable output (docs/METRICS.md): relevance 0, empty fields, not valid."""
    return {name: _empty(_PROPS[name]) for name in REQUIRED_FIELDS} | {"is_valid_json": False}


def shortest_answer() -> str:
    """The shortest complete answer the schema admits, compact, with the widest score (the grammar's budget reserve)."""
    def least(prop: dict[str, Any]) -> Any:
        return prop["maximum"] if prop["type"] == "integer" else _empty(prop)

    return json.dumps({name: least(prop) for name, prop in answer_json_schema()["properties"].items()}, separators=(",", ":"))


def parse_prediction(text: str) -> dict[str, Any]:
    """A model continuation -> prediction record (docs/EVALUATION.md, "The parse rule").

    The first top-level JSON object of the text, decoded with json.JSONDecoder.raw_decode from the
    first '{' (anything before it or after the object is ignored), is valid iff it is an object
    that validates against NewsAnswer: relevance_score an integer 1-10 (not a bool or float),
    summary a string, key_insights and company_names lists of strings; extra keys are ignored.
    Anything else becomes the invalid record.
    """
    start = text.find("{")
    if start < 0:
        return invalid_prediction()
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
        answer = NewsAnswer.model_validate(obj)
    except (json.JSONDecodeError, ValidationError):
        return invalid_prediction()
    return {name: _plain(getattr(answer, name)) for name in REQUIRED_FIELDS} | {"is_valid_json": True}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _field_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(x) for x in e["loc"]) or "answer"
    if e["type"] == "missing":
        return f"{where}: missing"
    return f"{where}: {e['msg'].lower()} (got {e.get('input')!r})"


def parse_line(line: str) -> tuple[str, str, dict[str, Any]]:
    """One JSONL line -> (user prompt, assistant answer text, metadata); ValueError names the field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError("a line must be a JSON object with 'messages'")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or len(msgs) != 2:
        raise ValueError("messages: expected [user, assistant] (2 messages)")
    for i, (msg, role) in enumerate(zip(msgs, ("user", "assistant"))):
        if not isinstance(msg, dict) or msg.get("role") != role:
            raise ValueError(f"messages[{i}].role: expected {role!r}")
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            raise ValueError(f"messages[{i}].content: expected a non-empty string")
    answer = msgs[1]["content"]
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError as e:
        raise ValueError(f"messages[1].content: the assistant answer is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("messages[1].content: the assistant answer must be a JSON object")
    try:
        NewsAnswer.model_validate(obj)
    except ValidationError as e:
        raise ValueError(f"messages[1].content.{_field_error(e)}") from None
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata: expected an object")
    return msgs[0]["content"], answer, meta


def read_jsonl(path: Path, all_errors: bool = False) -> tuple[list[Example], list[str]]:
    """Examples of a file and its errors as `file:line: reason`; raises on the first unless `all_errors`."""
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                user, answer, meta = parse_line(line)
            except ValueError as e:
                msg = f"{path}:{lineno}: {e}"
                if not all_errors:
                    raise DataError(msg) from None
                errors.append(msg)
                continue
            item_id = str(meta.get("item_id") or f"{path.name}:{lineno}")
            examples.append(Example(id=item_id, user=user, answer=answer, meta={**meta, "line": lineno}))
    return examples, errors


def item_date(ex: Example) -> datetime | None:
    """The newsletter date of an item, if it has a parseable one."""
    raw = ex.meta.get("email_date")
    try:
        return parsedate_to_datetime(raw) if raw else None
    except (TypeError, ValueError):
        return None


def _title(ex: Example) -> str:
    return " ".join(str(ex.meta.get("article_title", "")).replace("*", "").lower().split())


def find_leaks(train: list[Example], test: list[Example]) -> list[str]:
    """Test items that share an item_id or a (normalised) title with a training item."""
    ids = {e.id for e in train}
    titles = {_title(e) for e in train} - {""}
    leaks = []
    for e in test:
        if e.id in ids:
            leaks.append(f"item_id {e.id!r} is in both splits")
        elif _title(e) in titles:
            leaks.append(f"title {e.meta.get('article_title', '').strip()!r} ({e.id}) is in both splits")
    return leaks


#: the aggregates of a news evaluation as tables, plots, the CLI and the pipeline show them (docs/EVALUATION.md)
METRICS: tuple[Metric, ...] = (
    Metric("json_validation_rate", "JSON validity", "pct", "high", "headline", ("JSON\nvalidity", "unit")),
    Metric("field_f1_overall", "F1 overall", "f3", "high", "headline", ("F1\noverall", "unit")),
    Metric("field_f1_key_insights", "F1 key insights", "f3", "high", "summary"),
    Metric("field_f1_company_names", "F1 company names", "f3", "high", "summary"),
    Metric("field_f1_precision_overall", "Precision (pooled)", "f3", "high", heatmap=("Precision\n(pooled)", "unit")),
    Metric("field_f1_recall_overall", "Recall (pooled)", "f3", "high", heatmap=("Recall\n(pooled)", "unit")),
    Metric("jaccard_key_insights", "Jaccard key insights", "f3", "high"),
    Metric("jaccard_company_names", "Jaccard company names", "f3", "high"),
    Metric("jaccard_overall", "Jaccard overall", "f3", "high", "summary", ("Jaccard\noverall", "unit")),
    Metric("exact_match_rate", "Exact match", "pct", "high", "summary", ("Exact\nmatch", "unit")),
    Metric("relevance_mae", "Relevance MAE", "f3", "low", "headline", ("Relevance\nMAE", "mae")),
    Metric("relevance_r2", "Relevance R²", "f3", "high", heatmap=("Relevance\nR²", "r2")),
    Metric("relevance_adjusted_r2", "Relevance adjusted R²", "f3", "high"),
    Metric("rouge1", "ROUGE-1", "f3", "high", "summary"),
    Metric("rouge2", "ROUGE-2", "f3", "high"),
    Metric("rougeL", "ROUGE-L", "f3", "high", "summary", ("ROUGE-L", "unit")),
    Metric("rougeLsum", "ROUGE-Lsum", "f3", "high"),
    Metric("bertscore_precision", "BERTScore precision", "f3", "high"),
    Metric("bertscore_recall", "BERTScore recall", "f3", "high"),
    Metric("bertscore_f1", "BERTScore F1", "f3", "high", heatmap=("BERTScore\nF1", "unit")),
    Metric("semantic_similarity", "Semantic similarity (BERTScore F1, both summaries non-empty)", "f3", "high"),
    Metric("sponsored_ad_precision", "Sponsored-ad precision", "f3", "high"),
    Metric("sponsored_ad_recall", "Sponsored-ad recall", "f3", "high"),
    Metric("sponsored_ad_f1", "Sponsored-ad F1", "f3", "high", heatmap=("Sponsored-ad\nF1", "unit")),
    Metric("sponsored_ad_accuracy", "Sponsored-ad accuracy", "f3", "high"),
    Metric("sponsored_ad_true_positives", "Sponsored-ad TP", "int", None),
    Metric("sponsored_ad_false_positives", "Sponsored-ad FP", "int", None),
    Metric("sponsored_ad_true_negatives", "Sponsored-ad TN", "int", None),
    Metric("sponsored_ad_false_negatives", "Sponsored-ad FN", "int", None),
    Metric("avg_length", "Length mean (chars)", "f2", None),
    Metric("std_length", "Length SD (chars)", "f2", None),
    Metric("min_length", "Length min", "int", None),
    Metric("max_length", "Length max", "int", None),
    Metric("output_consistency", "Consistency: CV = SD / mean length", "f3", "low"),
)


class NewsTask(Task):
    """Newsletter items annotated with relevance, summary, key insights and company names."""

    name = "news"
    title = "news"
    input_fields = ("title", "content")
    suite = "fields"
    json_stop = True
    serve_kind = "analyze"
    metrics = METRICS
    objectives = ("val_loss", "f1")

    def files(self) -> dict[str, Path]:
        return {
            "train": find_file(self.cfg, self.cfg.train_file or TRAIN_FILE),
            "test": find_file(self.cfg, self.cfg.test_file or TEST_FILE),
        }

    def validate(self, all_errors: bool = False) -> list[str]:
        errors: list[str] = []
        for path in self.files().values():
            errors += read_jsonl(path, all_errors)[1]
        return errors

    def load(self) -> Splits:
        files = self.files()
        train = read_jsonl(files["train"])[0]
        test = read_jsonl(files["test"])[0]
        val: list[Example] = []
        if self.cfg.val_fraction > 0:
            # Temporal: the latest items (by newsletter date, then file order) become validation.
            order = sorted(range(len(train)), key=lambda i: (item_date(train[i]) is not None, item_date(train[i]) or datetime.min, i))
            n_val = max(1, round(len(train) * self.cfg.val_fraction))
            keep = set(order[: len(train) - n_val])
            val = [train[i] for i in order[len(train) - n_val:]]
            train = [e for i, e in enumerate(train) if i in keep]
        return Splits(train=train, val=val, test=test)

    def stats(self, splits: Splits) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.name, "splits": {}}
        for name, exs in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            if not exs:
                continue
            answers = [json.loads(e.answer) for e in exs]
            dates = [d for d in map(item_date, exs) if d]
            out["splits"][name] = {
                "n": len(exs),
                "date_range": [min(dates).date().isoformat(), max(dates).date().isoformat()] if dates else None,
                "relevance": dict(sorted(Counter(a["relevance_score"] for a in answers).items())),
                "mean_key_insights": sum(len(a["key_insights"]) for a in answers) / len(exs),
                "mean_company_names": sum(len(a["company_names"]) for a in answers) / len(exs),
                "sponsored": sum(SPONSORED_MARKER in a["summary"].lower() for a in answers),
                "mean_prompt_chars": sum(len(e.user) for e in exs) / len(exs),
            }
        out["leakage"] = find_leaks(splits.train + splits.val, splits.test)
        return out

    def make_user_prompt(self, **fields: str) -> str:
        return PROMPT_TEMPLATE.format(title=fields["title"], content=fields["content"])

    def request_fields(self, ex: Example) -> dict[str, str]:
        return {"title": str(ex.meta.get("article_title") or ex.id),
                "content": str(ex.meta.get("truncated_content") or ex.meta.get("original_content") or ex.user)}

    @classmethod
    def parse_output(cls, text: str) -> dict[str, Any]:
        return parse_prediction(text)

    @classmethod
    def answer_of(cls, parsed: dict[str, Any]) -> tuple[Any, bool]:
        valid = bool(parsed.get("is_valid_json"))
        return ({k: v for k, v in parsed.items() if k != "is_valid_json"} if valid else None), valid

    @classmethod
    def answer_schema(cls) -> dict[str, Any]:
        return answer_json_schema()

    @classmethod
    def grammar(cls) -> tuple[str, int]:
        from llguidance import LLMatcher

        return LLMatcher.grammar_from_json_schema(answer_json_schema()), len(shortest_answer()) + 8

    @classmethod
    def score(cls, examples: list[Example], rows: list[dict[str, Any]]) -> tuple[list, list, dict, dict]:
        from newsray.evaluate.metrics import Record, aggregate_metrics, per_example_metrics

        preds, refs = [], []
        for i, (ex, row) in enumerate(zip(examples, rows)):
            preds.append({"id": i, "example_id": i, **json.loads(row["parsed"])})
            gold = json.loads(ex.answer)
            refs.append({"id": i, "example_id": i, **{k: gold[k] for k in REQUIRED_FIELDS}, "is_valid_json": True})
        p, r = [Record.from_dict(x) for x in preds], [Record.from_dict(x) for x in refs]
        return preds, refs, per_example_metrics(p, r), aggregate_metrics(p, r)

    @classmethod
    def reference_id(cls, ref: Any) -> Any:
        return ref.id if ref.id is not None else ref.example_id

    @classmethod
    def claims(cls, prediction: Any) -> bool:
        return not (isinstance(prediction, dict) and "gold" in prediction)  # anything but a labelled record

    @classmethod
    def same_reference(cls, a: Any, b: Any) -> bool:
        return bool(a == b)
