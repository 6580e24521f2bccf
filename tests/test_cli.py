"""The real `newsray` console script, in subprocesses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [str(Path(sys.executable).with_name("newsray"))]


def run(*args, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def test_data_validate_passes_on_the_shipped_data(data_dir):
    r = run("data", "validate", f"data.root={data_dir}")
    assert r.returncode == 0, r.stderr
    assert "ok news: 364 train, 0 val, 96 test" in r.stdout.replace("\n", " ")
    assert "leakage" in r.stderr  # the 4 shared titles are reported, not fatal
    r = run("data", "validate", f"data.root={data_dir}", "data.task=agnews")
    assert r.returncode == 0 and "1000 train, 0 val, 100 test" in r.stdout


def test_bad_line_is_one_clear_error_without_traceback(tmp_path, data_dir):
    shutil.copytree(data_dir / "news", tmp_path / "news", ignore=shutil.ignore_patterns("published_eval"))
    path = tmp_path / "news" / "news_test_data.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[4])
    row["messages"][1]["content"] = row["messages"][1]["content"].replace('"relevance_score": ', '"relevance_score": 1')
    lines[4] = json.dumps(row)
    lines[9] = lines[9][:-20]
    path.write_text("\n".join(lines) + "\n")
    r = run("data", "validate", f"data.root={tmp_path}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = " ".join(r.stderr.split())
    assert f"{path}:5: messages[1].content.relevance_score: input should be less than or equal to 10" in err
    r = run("data", "validate", "--all", f"data.root={tmp_path}")
    assert r.returncode == 1
    assert ":5: " in r.stderr and ":10: not valid JSON" in r.stderr and "2 bad record(s)" in r.stderr


def test_missing_data_and_bad_config_are_one_line(tmp_path, monkeypatch):
    r = run("data", "stats", f"data.root={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "NEWSRAY_DATA_DIR" in r.stderr
    bad = tmp_path / "c.yaml"
    bad.write_text("lora:\n  rank: 8\n")
    r = run("config", "show", "-c", str(bad))
    assert r.returncode == 2 and "lora.rank: unknown key" in " ".join(r.stderr.split())


def test_config_show_resolves_overrides_and_env(tmp_path):
    r = run("config", "show", "-c", "configs/news-smollm2-135m-cpu.yaml", "train.max_steps=3",
            env={"NEWSRAY_RUN_DIR": str(tmp_path)}, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "max_steps: 3" in r.stdout and f"run_dir: {tmp_path}" in r.stdout
    r = run("config", "show", "--fields")
    assert r.returncode == 0 and "train.learning_rate" in r.stdout


def test_data_stats_json_and_tracked(tmp_path, data_dir):
    r = run("data", "stats", "--json", "--track", f"data.root={data_dir}", "data.val_fraction=0.1",
            f"tracking.run_dir={tmp_path}", env={"MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert {k: v["n"] for k, v in stats["splits"].items()} == {"train": 328, "val": 36, "test": 96}
    assert len(stats["leakage"]) == 4 and stats["mlflow_run_id"]
    assert (tmp_path / "mlflow.db").is_file()


@pytest.mark.slow
def test_model_prepare_reports_the_cached_model(embedded_model):
    r = run("model", "prepare")
    assert r.returncode == 0, r.stderr
    assert "ready smollm2-135m-instruct (embedded)" in " ".join(r.stdout.split())
    r = run("model", "prepare", "no-such-model")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_score_prints_the_published_aggregates(data_dir, tmp_path):
    pe = data_dir / "news" / "published_eval"
    r = run("score", str(pe / "unsloth_predictions_standardized.json"), str(pe / "test_references_standardized.json"), "--json")
    assert r.returncode == 0, r.stderr
    published = json.loads(next(pe.glob("three_model_quality_metrics_aggregated_*.json")).read_text())["unsloth"]
    got = json.loads(r.stdout)
    for key in ("field_f1_overall", "relevance_mae", "json_validation_rate", "rougeL"):
        assert got[key] == pytest.approx(published[key], rel=1e-9)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(json.loads((pe / "unsloth_predictions_standardized.json").read_text())[:10]))
    r = run("score", str(short), str(pe / "test_references_standardized.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "10" in r.stderr and "96" in r.stderr
