"""Serving pieces that need no running Serve: token resolution, model ids, request schemas, Serve YAMLs."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # ray.auth_mode's default, set before Ray is imported (see init_ray)

import pytest
import yaml
from pydantic import ValidationError

from newsray.config import load_config
from newsray.errors import ConfigError, ModelError
from newsray.serving.app import AppArgs, resolve_models, resolve_token
from newsray.serving.http import route_path, token_matches
from newsray.serving.schemas import AnalyzeRequest, ChatCompletionRequest, ClassifyRequest

REPO = Path(__file__).resolve().parents[1]


def test_token_from_env_then_file(tmp_path, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text("file-token\n")
    cfg = load_config(None, ["serve.auth_token_env=NR_TEST_TOKEN", f"serve.auth_token_file={secret}"])
    monkeypatch.setenv("NR_TEST_TOKEN", "env-token")
    assert resolve_token(cfg.serve) == "env-token"
    monkeypatch.setenv("NR_TEST_TOKEN", "")
    assert resolve_token(cfg.serve) == "file-token"
    assert resolve_token(load_config(None, []).serve) is None


def test_served_spec_applies_serve_dtype(monkeypatch):
    from newsray.serving import served_spec

    monkeypatch.setattr("newsray.models.native_bf16", lambda device: device == "cpu")
    assert served_spec("baseline", load_config(None, ["model.dtype=float32"])).model.dtype == "bfloat16"
    assert served_spec("baseline", load_config(None, ["model.dtype=float32", "serve.dtype=model"])).model.dtype == "float32"
    assert served_spec("baseline", load_config(None, ["model.dtype=auto"]), "cuda:0").model.dtype == "auto"  # no native bf16 there
    with pytest.raises(ConfigError, match="serve.dtype"):
        load_config(None, ["serve.dtype=int8"])


def test_auth_configured_but_missing_fails_closed(tmp_path, monkeypatch):
    monkeypatch.delenv("NR_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"\$NR_TEST_TOKEN holds no token"):
        resolve_token(load_config(None, ["serve.auth_token_env=NR_TEST_TOKEN"]).serve)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_token(load_config(None, [f"serve.auth_token_file={tmp_path / 'nope'}"]).serve)


@pytest.mark.parametrize("header,ok", [
    ("Bearer s3cret", True), ("bearer s3cret", True), ("Bearer s3cret ", True),
    ("Bearer s3cre", False), ("Bearer s3cretx", False), ("Basic s3cret", False), ("s3cret", False), ("", False), (None, False),
    ("Bearer \u00e9t\u00e9", False),
])
def test_token_matches(header, ok):
    assert token_matches(header, "s3cret") is ok


def test_public_paths_are_matched_below_the_route_prefix():
    assert route_path({"path": "/healthz"}) == "/healthz"
    assert route_path({"path": "/b/healthz", "root_path": "/b"}) == "/healthz"
    assert route_path({"path": "/bx/healthz", "root_path": "/b"}) == "x/healthz"  # not public: needs the token
    assert route_path({"path": "/b", "root_path": "/b"}) == "/"


def test_model_ids_and_refs(tmp_path):
    """Ids as requests name them; a registry alias pinned to its version (a real SQLite registry)."""
    from mlflow import MlflowClient

    adapter = tmp_path / "runs" / "alpha"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("newsray-news")
    for _ in range(2):
        client.create_model_version("newsray-news", source=str(adapter))
    client.set_registered_model_alias("newsray-news", "champion", "2")
    track = f"tracking.uri={uri}"
    cfg = load_config(None, [track, f"serve.adapters={{alpha: {adapter}, champ: 'models:/newsray-news@champion'}}"])
    default, refs = resolve_models(cfg, "baseline")
    assert default == "baseline"
    assert refs == {"baseline": "baseline", "alpha": str(adapter), "champ": "models:/newsray-news/2"}
    default, refs = resolve_models(load_config(None, [track]), "models:/newsray-news@champion")
    assert default == "newsray-news-champion" and refs[default] == "models:/newsray-news/2"  # the id keeps the alias's name
    with pytest.raises(ModelError, match="no version under that alias") as info:
        resolve_models(load_config(None, [track]), "models:/newsray-news@nope")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="already the default"):
        resolve_models(load_config(None, [f"serve.adapters={{alpha: {adapter}}}"]), str(adapter))
    with pytest.raises(ModelError, match="not a PEFT adapter directory"):
        resolve_models(load_config(None, []), str(tmp_path))


def test_serve_config_checks():
    with pytest.raises(ConfigError, match="max_replicas"):
        load_config(None, ["serve.num_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="adapters"):
        load_config(None, ["serve.adapters={'../x': y}"])


def test_request_schemas():
    assert AnalyzeRequest(title="t", content="c").model is None
    for bad in ({"title": " ", "content": "c"}, {"title": "t", "content": ""}, {"title": "t"}, {"title": 1, "content": "c"},
                {"title": "t", "content": "c", "extra": 1}, {"title": "t", "content": "c", "max_new_tokens": 0},
                {"title": "t", "content": "c", "model": ""}):
        with pytest.raises(ValidationError):
            AnalyzeRequest.model_validate(bad)
    assert ClassifyRequest(content="x").title == ""
    with pytest.raises(ValidationError, match="both be empty"):
        ClassifyRequest(title=" ", content="")
    ok = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3, "seed": 1}
    req = ChatCompletionRequest.model_validate(ok)
    assert req.messages[0].text() == "hi" and req.budget() == 3
    for bad in ({"stream": True}, {"n": 2}, {"messages": []}, {"messages": [{"role": "assistant", "content": "x"}]},
                {"messages": [{"role": "user", "content": "  "}]}, {"temperature": float("nan")}, {"max_tokens": -1}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(ok | bad)


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_serve_yaml_is_deployable(name):
    """The shipped Serve configs validate as Serve deploy configs and import from the package."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve" / name).read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert "working_dir" not in (app.runtime_env or {})  # serve deploy rejects a local working_dir
    args = AppArgs.model_validate(app.args)
    load_config(args.config, args.overrides)  # the overrides are valid newsray config
    assert {d.name for d in app.deployments} == {"NewsrayModel", "NewsrayIngress"}
    assert schema.http_options.host == "127.0.0.1"


def test_a_taken_port_is_refused_before_any_work(tmp_path, monkeypatch):
    """serve.port held by another listener: one sentence from check_port, and from `newsray pipeline`
    before its search starts (no MLflow run, nothing under the run dir)."""
    import socket

    from newsray.pipeline import pipeline
    from newsray.serving import check_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = load_config(None, [f"serve.port={port}", f"tracking.run_dir={tmp_path / 'runs'}", "data.val_fraction=0.1"])
        with pytest.raises(ConfigError, match=rf"serve.port {port} on 127.0.0.1 is not free .*pass serve.port="):
            check_port(cfg)
        with pytest.raises(ConfigError, match=rf"serve.port {port}"):
            pipeline(cfg)
        assert not (tmp_path / "runs").exists()
        check_port(load_config(None, [f"serve.port={port}", "pipeline.serve=false", "ray.address=ray://x:10001"]))  # a cluster's port: not ours
    check_port(cfg)  # free again


def test_an_evicted_adapter_is_unloaded_once():
    import gc

    from newsray.serving.app import Loaded

    calls: list[int] = []
    loaded = Loaded(generator=None, task="news", prompt=str, unload=lambda: calls.append(1))
    loaded.__del__()  # what Serve's LRU does on eviction
    del loaded
    gc.collect()  # and Python again at collection
    assert calls == [1]
