"""The Task interface owns the task facts: nothing outside newsray/tasks/ branches on a task name, and the
news answer schema is written once (NewsAnswer), the rest derived from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from newsray.tasks import TASKS, serve_task, task_type
from newsray.tasks.news import (
    REQUIRED_FIELDS,
    SCHEMA_BOUNDS,
    NewsAnswer,
    answer_json_schema,
    invalid_prediction,
    parse_prediction,
    shortest_answer,
)

PKG = Path(__file__).resolve().parents[2] / "newsray"
# the same pattern as `grep -rn 'task == \|\.task ==\|task != \|== "news"\|== "agnews"\|task.name ==' newsray`
BRANCH = re.compile(r'task == |\.task ==|task != |== "news"|== "agnews"|task.name ==')


def test_no_task_name_branch_outside_tasks():
    hits = [f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}"
            for p in sorted(PKG.rglob("*.py")) if PKG / "tasks" not in p.parents
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if BRANCH.search(line)]
    assert hits == []


def test_tasks_import_no_upper_layer_at_module_level():
    upper = ("newsray.evaluate", "newsray.serving", "newsray.generation", "newsray.train", "newsray.pipeline")
    for p in sorted((PKG / "tasks").glob("*.py")):
        for node in ast.parse(p.read_text(encoding="utf-8")).body:  # module level only: lazy imports in methods are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(upper)], f"{p.name} imports {names} at module level"


def test_schema_facts_derive_from_newsanswer():
    assert tuple(NewsAnswer.model_fields) == ("relevance_score", "summary", "key_insights", "company_names")
    assert REQUIRED_FIELDS == ("relevance_score", "key_insights", "company_names", "summary")  # the published record layout
    assert invalid_prediction() == {"relevance_score": 0, "key_insights": [], "company_names": [], "summary": "", "is_valid_json": False}
    assert list(invalid_prediction()) == [*REQUIRED_FIELDS, "is_valid_json"]
    b = SCHEMA_BOUNDS
    assert answer_json_schema() == {
        "type": "object",
        "properties": {
            "relevance_score": {"type": "integer", "minimum": 1, "maximum": 10},
            "summary": {"type": "string", "maxLength": b["summary_chars"]},
            "key_insights": {"type": "array", "items": {"type": "string", "maxLength": b["insight_chars"]}, "maxItems": b["max_insights"]},
            "company_names": {"type": "array", "items": {"type": "string", "maxLength": b["company_chars"]}, "maxItems": b["max_companies"]},
        },
        "required": ["relevance_score", "summary", "key_insights", "company_names"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_pattern": r"[ \n]{0,8}", "item_separator": ",", "key_separator": ":"},
    }
    assert list(answer_json_schema()["properties"]) == list(NewsAnswer.model_fields)
    assert shortest_answer() == '{"relevance_score":10,"summary":"","key_insights":[],"company_names":[]}'
    rec = parse_prediction('{"summary": "s", "company_names": ["A"], "key_insights": [], "relevance_score": 3, "x": 1}')
    assert list(rec) == list(invalid_prediction()) and rec["is_valid_json"] is True


def test_invalid_record_is_the_tasks():
    from newsray.evaluate.metrics import Record

    assert Record.invalid() == Record(0.0, (), (), "", False)
    assert Record.from_dict({"is_valid_json": False, "id": 3}).id == 3


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_states_its_facts(name):
    t = task_type(name)
    assert t.name == name and serve_task(t.serve_kind) == name
    assert t.suite in ("fields", "labels") and (t.suite == "labels") == bool(t.labels) == (not t.json_stop)
    headline = t.metric_keys("headline")
    assert headline and set(headline) <= set(t.metric_keys()) and t.summary_keys()[-2:] == ("n", "examples_per_s")
    assert all(m.better in ("high", "low", None) and m.fmt in ("pct", "f3", "f2", "int") for m in t.metrics)
    assert (t.answer_schema() is None) == bool(t.labels)


def test_config_knows_every_task():
    from typing import get_args

    from newsray.config import TaskName  # config sits below tasks/, so it spells the names once more

    assert set(get_args(TaskName)) == set(TASKS)


def test_headline_metrics():
    assert task_type("news").metric_keys("headline") == ("json_validation_rate", "field_f1_overall", "relevance_mae")
    assert task_type("agnews").summary_keys() == ("accuracy", "macro_f1", "unmatched", "n", "examples_per_s")
    assert (task_type("news").objectives, task_type("agnews").objectives) == (("val_loss", "f1"), ("val_loss", "accuracy"))


def test_parse_and_answer_rules():
    news, ag = task_type("news"), task_type("agnews")
    assert news.answer_of(news.parse_output("no json")) == (None, False)
    ans, ok = news.answer_of(news.parse_output('{"relevance_score": 7, "summary": "s", "key_insights": [], "company_names": []}'))
    assert ok and ans == {"relevance_score": 7, "key_insights": [], "company_names": [], "summary": "s"}
    assert ag.answer_of(ag.parse_output("It is sports.")) == ("Sports", True)
    assert ag.answer_of(ag.parse_output("no idea")) == (None, False)
    assert (ag.serve_answer("World news"), ag.serve_answer("?"), news.serve_answer("{")) == ({"label": "World"}, None, None)
    assert [n for n in TASKS if task_type(n).claims({"id": 0, "gold": "World", "predicted": None})] == ["agnews"]
    assert [n for n in TASKS if task_type(n).claims(invalid_prediction())] == ["news"]
