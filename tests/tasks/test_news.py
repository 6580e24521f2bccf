import json
import shutil
from pathlib import Path

import pytest

from newsray.config import DataConfig
from newsray.errors import DataError
from newsray.tasks.news import PROMPT_TEMPLATE, NewsAnswer, NewsTask, item_date


def task(root: Path, **kw) -> NewsTask:
    return NewsTask(DataConfig(task="news", root=str(root), **kw))


@pytest.fixture
def data_copy(tmp_path, data_dir) -> Path:
    shutil.copytree(data_dir / "news", tmp_path / "news", ignore=shutil.ignore_patterns("published_eval"))
    return tmp_path


def corrupt(root: Path, lineno: int, edit) -> Path:
    """Replace line `lineno` of the training file by edit(parsed line) (a dict, or a raw string)."""
    path = root / "news" / "news_train_data.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[lineno - 1])
    new = edit(row)
    lines[lineno - 1] = new if isinstance(new, str) else json.dumps(new)
    path.write_text("\n".join(lines) + "\n")
    return path


def edit_answer(**changes):
    def f(row):
        ans = json.loads(row["messages"][1]["content"])
        for k, v in changes.items():
            if v is KeyError:
                ans.pop(k)
            else:
                ans[k] = v
        row["messages"][1]["content"] = json.dumps(ans)
        return row
    return f


def test_shipped_data_is_valid(data_dir):
    t = task(data_dir)
    assert t.validate(all_errors=True) == []
    splits = t.load()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (364, 0, 96)
    for ex in splits.train[:5]:
        NewsAnswer.model_validate_json(ex.answer)


def test_published_prompt_template_reproduces_every_prompt(data_dir):
    splits = task(data_dir).load()
    for ex in splits.train + splits.test:
        assert task(data_dir).make_user_prompt(title=ex.meta["article_title"], content=ex.meta["truncated_content"]) == ex.user
    assert PROMPT_TEMPLATE.startswith("Analyze this newsletter item:")


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r and '{"messages": [', "not valid JSON"),
    (edit_answer(relevance_score=11), "relevance_score: input should be less than or equal to 10 (got 11)"),
    (edit_answer(relevance_score=0), "relevance_score: input should be greater than or equal to 1"),
    (edit_answer(relevance_score="7"), "relevance_score: input should be a valid integer"),
    (edit_answer(relevance_score=True), "relevance_score: input should be a valid integer"),
    (edit_answer(summary=KeyError), "messages[1].content.summary: missing"),
    (edit_answer(key_insights="AI"), "key_insights: input should be a valid list"),
    (edit_answer(company_names=[1]), "company_names.0: input should be a valid string"),
    (lambda r: {**r, "messages": r["messages"][:1]}, "messages: expected [user, assistant]"),
    (lambda r: {**r, "messages": [r["messages"][0], {"role": "assistant", "content": "{not json"}]}, "the assistant answer is not valid JSON"),
])
def test_bad_line_names_file_line_and_field(data_copy, edit, expected):
    path = corrupt(data_copy, 17, edit)
    with pytest.raises(DataError) as e:
        task(data_copy).validate()
    assert str(e.value).startswith(f"{path}:17: ")
    assert expected in str(e.value)


def test_all_lists_every_bad_line(data_copy):
    corrupt(data_copy, 3, edit_answer(relevance_score=11))
    corrupt(data_copy, 40, lambda r: "{broken")
    errors = task(data_copy).validate(all_errors=True)
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in errors] == ["3", "40"]
    with pytest.raises(DataError, match=":3: "):
        task(data_copy).load()


def test_leakage_is_detected_by_title_and_id(data_dir, data_copy):
    leaks = task(data_dir).stats(task(data_dir).load())["leakage"]
    assert len(leaks) == 4 and all("title" in x for x in leaks)  # the published split shares 4 titles
    test_path = data_copy / "news" / "news_test_data.jsonl"
    first_train = (data_copy / "news" / "news_train_data.jsonl").read_text().splitlines()[0]
    test_path.write_text(test_path.read_text() + first_train + "\n")
    leaks = task(data_copy).stats(task(data_copy).load())["leakage"]
    assert any("item_id" in x for x in leaks) and len(leaks) == 5


def test_temporal_validation_split(data_dir):
    splits = task(data_dir, val_fraction=0.2).load()
    assert len(splits.val) == round(364 * 0.2) and len(splits.train) + len(splits.val) == 364
    assert max(map(item_date, splits.train)) <= min(map(item_date, splits.val))
    stats = task(data_dir, val_fraction=0.2).stats(splits)
    assert set(stats["splits"]) == {"train", "val", "test"}
    assert stats["splits"]["test"]["date_range"] == ["2024-12-02", "2025-10-21"]


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("NEWSRAY_DATA_DIR", raising=False)
    with pytest.raises(DataError) as e:
        task(tmp_path / "nowhere").files()
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "news" / "news_train_data.jsonl") in msg
    assert "NEWSRAY_DATA_DIR" in msg and "data.root" in msg


def test_env_var_points_at_the_data(data_dir, monkeypatch):
    monkeypatch.setenv("NEWSRAY_DATA_DIR", str(data_dir))
    assert NewsTask(DataConfig()).files()["train"] == data_dir / "news" / "news_train_data.jsonl"
