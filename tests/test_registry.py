"""The champion rule on a real MLflow registry (SQLite): versions are only added; the alias moves only when better."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from newsray.config import load_config
from newsray.errors import ModelError


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI, which newsray prefers: pin it here so that
    # monkeypatch removes it afterwards and no later test in this process logs into this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return load_config(None, [f"tracking.run_dir={tmp_path / 'runs'}"])


def logged_adapter(cfg, tmp_path: Path, tag: str) -> tuple[str, str]:
    """An MLflow run holding an adapter/ directory (the layout training logs); returns (runs:/ URI, run id)."""
    import mlflow

    from newsray import tracking

    d = tmp_path / f"adapter-{tag}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "tag": tag}))
    (d / "newsray_config.yaml").write_text(cfg.to_yaml())
    with tracking.start_run(cfg, run_name=f"train-{tag}", stage="train") as run:
        mlflow.log_artifacts(str(d), "adapter")
    return f"runs:/{run.info.run_id}/adapter", run.info.run_id


def test_champion_moves_only_when_better_and_versions_are_kept(cfg, tmp_path):
    import mlflow

    from newsray import tracking
    from newsray.generation import resolve_model_ref
    from newsray.registry import champion, register

    basis = "news:val_fraction=0.1:data=abc"
    uri1, run1 = logged_adapter(cfg, tmp_path, "one")
    first = register(cfg, uri1, run1, "val_loss", 1.50, basis, source="test one")
    assert (first.version, first.champion_moved, first.champion_version) == ("1", True, "1")
    assert first.reason == "there was no champion yet" and first.uri == "models:/newsray-news/1"

    uri2, run2 = logged_adapter(cfg, tmp_path, "two")
    worse = register(cfg, uri2, run2, "val_loss", 1.70, basis, source="test two")
    assert (worse.version, worse.champion_moved, worse.champion_version) == ("2", False, "1")
    assert "does not beat champion version 1 (1.5000, lower is better)" in worse.reason
    tie = register(cfg, uri2, run2, "val_loss", 1.50, basis, source="test tie")
    assert (tie.version, tie.champion_moved) == ("3", False)  # only strictly better moves it

    other_basis = register(cfg, uri2, run2, "val_loss", 0.10, "news:val_fraction=0.2:data=abc", source="test basis")
    assert not other_basis.champion_moved and "not comparable" in other_basis.reason
    other_objective = register(cfg, uri2, run2, "f1", 0.99, basis, source="test f1")
    assert not other_objective.champion_moved and "scored on val_loss" in other_objective.reason

    better = register(cfg, uri2, run2, "val_loss", 1.20, basis, source="test better")
    assert (better.version, better.champion_moved, better.champion_version) == ("6", True, "6")
    assert "beats champion version 1" in better.reason

    client = mlflow.MlflowClient(tracking.tracking_uri(cfg), registry_uri=tracking.tracking_uri(cfg))
    versions = {str(v.version): v for v in client.search_model_versions("name='newsray-news'")}
    assert sorted(versions, key=int) == ["1", "2", "3", "4", "5", "6"]  # nothing deleted or overwritten
    assert versions["2"].tags["newsray.objective_value"] == "1.7" and versions["2"].tags["newsray.objective_mode"] == "min"
    assert versions["1"].source == uri1 and "val_loss = 1.5 (lower is better)" in versions["1"].description
    champ = champion(cfg)
    assert str(champ.version) == "6" and math.isclose(float(champ.tags["newsray.objective_value"]), 1.2)

    spec = resolve_model_ref("models:/newsray-news@champion", cfg)  # what evaluate and serve do with it
    assert json.loads((spec.adapter_dir / "adapter_config.json").read_text())["tag"] == "two"
    spec = resolve_model_ref("models:/newsray-news/1", cfg)
    assert json.loads((spec.adapter_dir / "adapter_config.json").read_text())["tag"] == "one"

    with pytest.raises(ModelError, match="is nan, not a finite number"):
        register(cfg, uri1, run1, "val_loss", float("nan"), basis, source="nan")
    assert len(client.search_model_versions("name='newsray-news'")) == 6


def test_max_objectives_and_basis(cfg, tmp_path):
    from newsray.registry import better, objective_basis, register

    assert better(0.6, 0.5, "max") and not better(0.5, 0.6, "max") and better(0.5, 0.6, "min")
    b = objective_basis(cfg, {"train": "aa", "test": "bb"})
    assert b.startswith("news:val_fraction=0:data=") and b != objective_basis(cfg, {"train": "ab", "test": "bb"})
    uri, run = logged_adapter(cfg, tmp_path, "f1")
    assert register(cfg, uri, run, "f1", 0.40, b, source="a").champion_moved
    assert not register(cfg, uri, run, "f1", 0.30, b, source="b").champion_moved
    assert register(cfg, uri, run, "f1", 0.45, b, source="c").champion_version == "3"
