import pytest

from newsray.config import DataConfig
from newsray.errors import ConfigError, DataError
from newsray.tasks.agnews import LABELS, AgNewsTask, parse_label


def task(root, **kw) -> AgNewsTask:
    return AgNewsTask(DataConfig(task="agnews", root=str(root), **kw))


def test_default_splits_are_the_published_ones(data_dir):
    t = task(data_dir)
    assert t.validate() == []
    s = t.load()
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 0, 100)
    assert s.test[0].id == "0" and s.test[-1].id == "99" and s.train[0].id == "100" and s.train[-1].id == "1099"
    first = s.test[0]
    assert first.user == ("Classify this news: Fears for T N pension after talks Unions representing workers at "
                          "Turner   Newall say they are 'disappointed' after talks with stricken parent firm Federal Mogul.\nAnswer:")
    assert first.answer == "Business"
    assert set(e.answer for e in s.test) == set(LABELS)


def test_backslash_n_escapes_become_newlines(data_dir):
    s = task(data_dir, train_rows=(0, 7000), test_rows=(7000, 7600)).load()
    texts = [e.user for e in s.train + s.test]
    assert not any("\\n" in t for t in texts)
    assert any("\n" in t[: -len("\nAnswer:")] for t in texts)


def test_validation_carved_from_training_rows(data_dir):
    s = task(data_dir, val_fraction=0.1).load()
    assert (len(s.train), len(s.val)) == (900, 100) and s.val[-1].id == "1099"


def test_overlapping_ranges_and_rows_beyond_the_file(data_dir):
    with pytest.raises(ValueError, match="overlaps"):
        DataConfig(task="agnews", train_rows=(50, 150), test_rows=(0, 100))
    with pytest.raises(DataError, match="the file has 7600 rows"):
        task(data_dir, train_rows=(100, 9000)).load()


def test_bad_csv_row_names_file_and_line(tmp_path):
    (tmp_path / "agnews").mkdir()
    path = tmp_path / "agnews" / "test.csv"
    path.write_text('"3","a","b"\n"7","title","text"\n"1","x"\n')
    with pytest.raises(DataError, match=rf"{path}:2: class: expected 1-4"):
        task(tmp_path).validate()
    errors = task(tmp_path).validate(all_errors=True)
    assert len(errors) == 2 and errors[1].startswith(f"{path}:3: expected 3 columns")


@pytest.mark.parametrize("text,label", [
    (" Sports", "Sports"), ("sci/tech.", "Sci/Tech"), ("It is about business, not world news", "Business"),
    ("I cannot tell", None), ("WORLD", "World"),
])
def test_parse_label(text, label):
    assert parse_label(text) == label


def test_unknown_task_is_a_config_error():
    from newsray.config import load_config

    with pytest.raises(ConfigError):
        load_config(None, ["data.task=weather"])
