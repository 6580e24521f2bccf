from pathlib import Path

import pytest

from newsray.config import Config, describe_fields, load_config, parse_override
from newsray.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert Path(cfg.tracking.run_dir).is_absolute()


def test_five_recipes_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"news-smollm2-135m-cpu", "news-llama3.2-1b-gpu", "news-llama3.2-1b-recommended-gpu",
            "agnews-llama3.2-3b-gpu", "agnews-smollm2-135m-cpu"} <= names


def test_published_news_recipe_matches_the_study():
    cfg = load_config(CONFIG_DIR / "news-llama3.2-1b-gpu.yaml")
    t, lora = cfg.train, cfg.lora
    assert (t.learning_rate, t.per_device_batch_size, t.grad_accum_steps, t.max_steps) == (2e-4, 4, 1, 455)
    assert (t.warmup_steps, t.optimizer, t.weight_decay, t.lr_scheduler, t.seed) == (10, "adamw_8bit", 0.01, "linear", 3407)
    assert cfg.model.max_seq_length == 2048
    assert (lora.r, lora.alpha) == (16, 16)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    rec = load_config(CONFIG_DIR / "news-llama3.2-1b-recommended-gpu.yaml")
    assert rec.lora.r == 32 and rec.train.learning_rate == 1.6e-3 and rec.train.max_steps >= 1000
    assert rec.train.per_device_batch_size * rec.train.grad_accum_steps * rec.train.num_workers == 128


def test_published_agnews_recipe_matches_the_study():
    cfg = load_config(CONFIG_DIR / "agnews-llama3.2-3b-gpu.yaml")
    t = cfg.train
    assert cfg.data.task == "agnews" and cfg.model.load_in_4bit and cfg.model.max_seq_length == 512
    assert (t.per_device_batch_size, t.grad_accum_steps, t.max_steps, t.learning_rate, t.warmup_steps) == (2, 4, 60, 2e-4, 5)
    assert (cfg.lora.r, cfg.lora.alpha, t.optimizer) == (16, 16, "adamw_8bit")
    assert cfg.data.train_rows == (100, 1100) and cfg.data.test_rows == (0, 100)


def test_unknown_key_names_file_and_yaml_path(tmp_path):
    p = write(tmp_path, "train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.learning_rat: unknown key" in str(e.value)


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="trainer: unknown key"):
        load_config(write(tmp_path, "trainer: {}\n"))


def test_wrong_type_names_path_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "lora:\n  r: sixteen\n"))
    assert "lora.r:" in str(e.value) and "'sixteen'" in str(e.value)


@pytest.mark.parametrize("text,path", [
    ("lora:\n  r: 0\n", "lora.r"),
    ("train:\n  learning_rate: -1\n", "train.learning_rate"),
    ("data:\n  task: sports\n", "data.task"),
    ("data:\n  train_rows: [0, 200]\n  test_rows: [0, 100]\n", "data"),
    ("tune:\n  num_samples: 0\n", "tune.num_samples"),
])
def test_nonsense_values_are_rejected(tmp_path, text, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_env_interpolation_with_default_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("NR_TEST_DIR", "/srv/data")
    monkeypatch.delenv("NR_UNSET", raising=False)
    cfg = load_config(write(tmp_path, "data:\n  root: ${NR_TEST_DIR}/news\ntracking:\n  run_dir: ${NR_UNSET:-/tmp/nr-runs}\n"))
    assert cfg.data.root == "/srv/data/news"
    assert cfg.tracking.run_dir == "/tmp/nr-runs"
    with pytest.raises(ConfigError, match=r"data\.root: environment variable \$\{NR_UNSET\} is not set"):
        load_config(write(tmp_path, "data:\n  root: ${NR_UNSET}\n"))


def test_empty_env_default_means_auto(tmp_path, monkeypatch):
    monkeypatch.delenv("NR_UNSET", raising=False)
    assert load_config(write(tmp_path, "data:\n  root: ${NR_UNSET:-}\n")).data.root is None


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(None, ["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]", "data.task=agnews", "eval.limit=5"])
    assert cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.task == "agnews" and cfg.eval.limit == 5
    with pytest.raises(ConfigError, match=r"override 'train\.lr=3': train\.lr: unknown key"):
        load_config(None, ["train.lr=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("learning_rate")


def test_override_wins_over_file(tmp_path):
    p = write(tmp_path, "train:\n  learning_rate: 0.5\n")
    assert load_config(p, ["train.learning_rate=0.25"]).train.learning_rate == 0.25


def test_relative_paths_become_absolute(tmp_path):
    cfg = load_config(write(tmp_path, "tracking:\n  run_dir: out/runs\n"), base_dir=tmp_path)
    assert cfg.tracking.run_dir == str(tmp_path / "out" / "runs")
    assert load_config(None, ["train.storage_path=s3://bucket/runs"]).train.storage_path == "s3://bucket/runs"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_every_field_is_documented_and_roundtrips():
    rows = describe_fields()
    assert len(rows) > 60
    assert all(desc for _, _, _, desc in rows), [r[0] for r in rows if not r[3]]
    cfg = load_config(None, ["train.max_steps=7"])
    assert Config.model_validate(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    assert cfg.flat()["train.max_steps"] == 7
