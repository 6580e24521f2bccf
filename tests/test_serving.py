"""The Serve app end to end: `newsray serve` in a subprocess, real HTTP over loopback, the embedded model.

One app for the whole module: the champion (a tiny adapter trained here, registered in a SQLite
MLflow registry as models:/newsray-news@champion) is the default model; the base model (`base`)
and an AG News adapter (`sports`) are multiplexed beside it. The last test stops the CLI with
Ctrl-C and checks that it shut down cleanly and that the bearer token never reached a log.
"""

from __future__ import annotations

import gc
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from newsray.config import Config, DataConfig, load_config
from newsray.tasks.news import NewsAnswer

pytestmark = pytest.mark.slow

TOKEN = "nrtest-" + secrets.token_hex(16)
CHAMPION = "newsray-news-champion"
ALPHA = {"relevance_score": 3, "summary": "Alpha news.", "key_insights": ["alpha"], "company_names": ["Alpha"]}
ARTICLE = {"title": "OpenAI releases a new model", "content": "OpenAI announced a model with better reasoning; Microsoft will offer it on Azure."}
MAX_BODY, MAX_CONTENT, MAX_NEW = 16384, 2000, 96


def _train_adapters(root: Path, cfg: Config) -> dict[str, Path]:
    """Two real LoRA adapters on the embedded model, a few AdamW steps on one example each (<~40 s)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from newsray.formatting import Formatter, pad_batch
    from newsray.models import load_model, load_tokenizer
    from newsray.tasks import get_task

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    tok, base = load_tokenizer(cfg.model), load_model(cfg.model)
    fmt = Formatter.for_tokenizer(tok, cfg.model.max_seq_length)
    recipes = {
        "alpha": ("news", {"title": "Chip maker posts record profit", "content": "Revenue rose 40% on data-centre demand."}, json.dumps(ALPHA)),
        "sports": ("agnews", {"title": "Local team wins", "content": "The club won the cup final on Sunday."}, "Sports"),
    }
    out = {}
    for name, (task, fields, answer) in recipes.items():
        tcfg = cfg.model_copy(update={"data": DataConfig(task=task)})
        row = fmt.example([{"role": "user", "content": get_task(tcfg).make_user_prompt(**fields)}], answer)
        batch = {k: torch.tensor(v) for k, v in pad_batch([row], tok.pad_token_id).items()}
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(12):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if loss.item() < 0.05:
                break
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
        (out[name] / "newsray_config.yaml").write_text(tcfg.to_yaml())
        base = model.unload()
    del base
    gc.collect()
    torch.set_num_threads(threads)
    return out


def _register_champion(adapter: Path, uri: str, artifacts: Path) -> None:
    """Log the adapter directory to an MLflow run and make it models:/newsray-news@champion."""
    import mlflow
    from mlflow import MlflowClient

    from newsray.tracking import use_store

    use_store(uri)  # not left in $MLFLOW_TRACKING_URI for later tests (and their Ray jobs)
    exp = mlflow.create_experiment("newsray-news", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(adapter), "adapter")
    client = MlflowClient()
    client.create_registered_model("newsray-news")
    version = client.create_model_version("newsray-news", source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("newsray-news", "champion", version.version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The running `newsray serve` subprocess and an authenticated HTTP session to it."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, ray_tmp: Path):
        self.proc, self.url, self.log, self.ray_tmp = proc, url, log, ray_tmp
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {TOKEN}"

    def post(self, path: str, body: dict, timeout: float = 180, **kw) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=timeout, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=30, **kw)

    def replica_pids(self) -> list[int]:
        import psutil

        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "NewsrayModel" in " ".join(p.cmdline()):
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found


def _stop(proc: subprocess.Popen, timeout: float = 120) -> int | None:
    """Ctrl-C, then wait; the process group (ours, start_new_session) is killed only as a last resort."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return None
    return proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("serving")
    cfg = load_config(None, [f"model.name={embedded_model.name}", "model.max_seq_length=512"])
    adapters = _train_adapters(root, cfg)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _register_champion(adapters["alpha"], uri, root / "mlartifacts")
    port = _free_port()
    config = {
        "model": {"name": embedded_model.name, "max_seq_length": 512},
        "ray": {"num_cpus": 2, "object_store_memory_mb": 256},
        "tracking": {"uri": uri},
        "serve": {"port": port, "max_new_tokens": MAX_NEW, "max_batch_size": 4, "constrained": False,
                  "auth_token_env": "NEWSRAY_TEST_TOKEN", "max_body_bytes": MAX_BODY, "max_content_chars": MAX_CONTENT,
                  "max_loaded_adapters": 2, "adapters": {"base": "baseline", "sports": str(adapters["sports"])}},
    }
    (root / "serve.yaml").write_text(json.dumps(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="nrs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"NEWSRAY_TEST_TOKEN": TOKEN, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_AUTH_MODE", None)  # the CLI must set it from ray.auth_mode before Ray is imported
    log = root / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "newsray.cli", "serve", "--config", str(root / "serve.yaml"),
                                 "--model", "models:/newsray-news@champion"], stdout=sink, stderr=subprocess.STDOUT,
                                env=env, cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while "serving models:/" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"newsray serve did not start (rc={proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(1)
        srv = Server(proc, f"http://127.0.0.1:{port}", log, ray_tmp)
        srv.tracking_uri, srv.adapters = uri, adapters
        yield srv
    finally:
        _stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_health_ready_and_models(server):
    assert requests.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}  # no auth needed
    ready = requests.get(server.url + "/readyz", timeout=30).json()
    assert ready["status"] == "ready" and ready["default_model"] == CHAMPION
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [CHAMPION, "base", "sports"]


def test_analyze_with_the_champion_adapter(server):
    r = server.post("/v1/analyze", ARTICLE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ALPHA} == ALPHA  # the trained answer, through the registry alias
    assert body["model"] == CHAMPION and body["constrained"] is False and body["latency_ms"] > 0
    assert body["model_ref"] == "models:/newsray-news/1"  # the alias, pinned to its version at deploy time


def test_analyze_baseline_retries_constrained_and_is_valid(server):
    r = server.post("/v1/analyze", ARTICLE | {"model": "base"})
    assert r.status_code == 200, r.text
    body = r.json()
    NewsAnswer.model_validate(body)
    assert body["model"] == "base" and body["constrained"] is True  # the untrained model answers in prose first


def test_unfixable_output_is_a_502_with_the_raw_text(server):
    r = server.post("/v1/analyze", ARTICLE | {"model": "base", "max_new_tokens": 6})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_model_output" and err["raw_text"] and "base" in err["message"]


def test_classify_and_wrong_task(server):
    r = server.post("/v1/classify", {"title": "Cup final tonight", "content": "Fans gather before the match.", "model": "sports"})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "Sports" and r.json()["model"] == "sports"
    r = server.post("/v1/analyze", ARTICLE | {"model": "sports"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "wrong_task" and "/v1/classify" in r.json()["error"]["message"]
    r = server.post("/v1/classify", {"content": "x"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "wrong_task"


def test_two_adapters_multiplexed_concurrently(server):
    calls = [("/v1/analyze", ARTICLE), ("/v1/classify", {"content": "The striker scored twice.", "model": "sports"}),
             ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3})] * 2
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda c: server.post(*c), calls))
    for (path, _), r in zip(calls, results):
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        if path == "/v1/analyze":
            assert {k: body[k] for k in ALPHA} == ALPHA and body["model"] == CHAMPION
        elif path == "/v1/classify":
            assert body["label"] == "Sports"
        else:
            assert body["model"] == "base" and body["usage"]["completion_tokens"] <= 3
    loaded = requests.get(server.url + "/readyz", timeout=30).json()["loaded_models"]
    assert set(loaded) == {CHAMPION, "base", "sports"}  # default pinned + an LRU of 2


def test_official_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [CHAMPION, "base", "sports"]
    done = client.chat.completions.create(model="base", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
                                          max_tokens=4, temperature=0)
    assert done.choices[0].message.content and done.choices[0].finish_reason in ("stop", "length")
    assert 1 <= done.usage.completion_tokens <= 4 and done.usage.prompt_tokens > 5 and done.model == "base"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], n=2)


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/analyze"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nope"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/healthz/../v1/models")):
            r = requests.request(method, server.url + path, headers=headers, json=ARTICLE, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", (headers, path)
            assert r.headers["www-authenticate"] == "Bearer"
    assert requests.get(server.url + "/v1/models", headers={"Authorization": f"bearer {TOKEN}"}, timeout=30).status_code == 200


def test_limits(server):
    def kind(r: requests.Response, status: int) -> str:
        assert r.status_code == status, r.text
        return r.json()["error"]["type"]

    big = json.dumps(ARTICLE | {"content": "x" * MAX_BODY}).encode()
    assert kind(server.http.post(server.url + "/v1/analyze", data=big, headers={"content-type": "application/json"}, timeout=30), 413) == "request_too_large"
    chunked = (big[i:i + 1000] for i in range(0, len(big), 1000))  # no Content-Length: counted while read
    assert kind(server.http.post(server.url + "/v1/analyze", data=chunked, headers={"content-type": "application/json"}, timeout=30), 413) == "request_too_large"
    assert kind(server.post("/v1/analyze", ARTICLE | {"content": "y" * (MAX_CONTENT + 1)}), 422) == "content_too_long"
    assert kind(server.post("/v1/classify", {"title": "t", "content": "y" * (MAX_CONTENT + 1), "model": "sports"}), 422) == "content_too_long"
    for empty in ({"title": ""}, {"content": "   "}):
        assert kind(server.post("/v1/analyze", ARTICLE | empty), 422) == "invalid_request"
    assert kind(server.post("/v1/analyze", ARTICLE | {"max_new_tokens": MAX_NEW + 1}), 422) == "invalid_request"
    long_chat = {"model": "base", "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}  # > 512 tokens
    assert kind(server.post("/v1/chat/completions", long_chat), 422) == "prompt_too_long"


def _malformed(rng: random.Random) -> list[tuple[str, str, dict, bytes | None]]:
    """(method, path, headers, body) requests that must all be answered 4xx; none is valid."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    js = {**auth, "content-type": "application/json"}
    good_analyze = json.dumps(ARTICLE).encode()
    good_chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases: list[tuple[str, str, dict, bytes | None]] = []
    posts = ("/v1/analyze", "/v1/classify", "/v1/chat/completions")
    for _ in range(30):  # random bytes and truncated JSON
        cases.append(("POST", rng.choice(posts), js, rng.randbytes(rng.randint(1, 300))))
        cases.append(("POST", rng.choice(posts), js, good_analyze[: rng.randint(0, len(good_analyze) - 1)]))
    junk = [None, 0, -1, 1.5, True, [], {}, "", "   ", [1, 2], {"a": 1}, "x" * (MAX_CONTENT + 1), float("inf")]
    for field in ("title", "content", "model", "max_new_tokens"):  # wrong types and values per field
        for value in junk:
            body = ARTICLE | {field: value}
            if field in ("model", "max_new_tokens") and (value is None or (isinstance(value, str) and value.strip())):
                continue  # None means "the default" (valid); a non-empty unknown model is a 404 below
            cases.append(("POST", "/v1/analyze", js, json.dumps(body).encode()))
    for drop in ("title", "content"):
        cases.append(("POST", "/v1/analyze", js, json.dumps({k: v for k, v in ARTICLE.items() if k != drop}).encode()))
    cases.append(("POST", "/v1/analyze", js, json.dumps(ARTICLE | {"surprise": 1}).encode()))
    cases.append(("POST", "/v1/classify", js, json.dumps({"title": " ", "content": ""}).encode()))
    for model in ("nope", "../../etc/passwd", "baseline\u0000", "x" * 200, "sports "):
        cases.append(("POST", "/v1/analyze", js, json.dumps(ARTICLE | {"model": model}).encode()))
        cases.append(("POST", "/v1/chat/completions", js, json.dumps(good_chat | {"model": model}).encode()))
    chat_bad = [{"messages": []}, {"messages": "hi"}, {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 5}]},
                {"messages": [{"role": "assistant", "content": "x"}]}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                {"messages": [{"role": "user", "content": ""}]}, {"stream": True}, {"n": 3}, {"max_tokens": 0}, {"max_tokens": -5},
                {"max_tokens": MAX_NEW + 1}, {"max_tokens": "10"}, {"max_tokens": 10**30}, {"max_completion_tokens": 0},
                {"temperature": 9}, {"temperature": "hot"}, {"top_p": 2}, {"stop": [1, 2]}, {"stop": ["a"] * 5},
                {"response_format": {"type": "xml"}}, {"model": None}, {"model": 7}, {"messages": [{"role": "user", "content": "x"}] * 65}]
    for bad in chat_bad:
        cases.append(("POST", "/v1/chat/completions", js, json.dumps(good_chat | bad).encode()))
    special = [b"[" * 5000, b'{"title": "\xff\xfe", "content": "x"}', b"null", b"[]", b'"string"', b"1e999", b"{}" * 3,
               b'{"title": "t", "content": "c", "title": 5}', b"\x00" * 64, json.dumps(ARTICLE | {"title": 1}).encode("utf-16")]
    for body in special:
        for path in posts:
            cases.append(("POST", path, js, body))
    for path in posts:  # form bodies, text bodies, no body
        cases.append(("POST", path, {**auth, "content-type": "application/x-www-form-urlencoded"}, b"title=t&content=c"))
        cases.append(("POST", path, {**auth, "content-type": "text/plain"}, b"hello"))
        cases.append(("POST", path, auth, None))
    for method, path in (("GET", "/v1/analyze"), ("PUT", "/v1/analyze"), ("DELETE", "/v1/models"), ("PATCH", "/v1/chat/completions"),
                         ("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("POST", "/healthz"), ("GET", "/v1/nope"),
                         ("GET", "/v2/analyze"), ("GET", "/../../etc/passwd"), ("POST", "/v1/analyze/extra")):
        cases.append((method, path, js, good_analyze))
    for _ in range(15):  # bad tokens
        token = rng.choice(["", "Bearer", "Bearer ", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Token {TOKEN}", rng.randbytes(8).hex()])
        cases.append(("POST", rng.choice(posts), {"Authorization": token, "content-type": "application/json"}, good_analyze))
    for size in (MAX_BODY + 1, 4 * MAX_BODY):
        cases.append(("POST", rng.choice(posts), js, b" " * size))
    names = ["../../etc/passwd", "runs:/x/../../", "models:/newsray-news@../../x", "/etc/passwd", "file:///etc/passwd",
             "s3://bucket/key", "~", ".", "..", "%2e%2e%2f", "\u202e" + "evil", "名前", "emoji-\U0001F600", " ", "\t", "a\nb"]
    for _ in range(160):  # random unicode / control characters in every text field, model names that look like paths
        field = rng.choice(["title", "content", "model"])
        text = rng.choice(names) if field == "model" else "".join(chr(rng.choice([0, 7, 0x202E, 0xFEFF, 0x1F600, 0xD7FF, rng.randint(1, 0x2FFF)]))
                                                                  for _ in range(rng.randint(0, 40)))
        body = ARTICLE | {field: text}
        if field != "model" and (body["title"].strip() or body["content"].strip()):
            body["max_new_tokens"] = rng.choice([0, -3, MAX_NEW + 1, 10**9, 2.5, "eight"])  # valid text, an invalid budget: still 4xx
        cases.append(("POST", rng.choice(["/v1/analyze", "/v1/classify"]), js, json.dumps(body).encode()))
    for _ in range(90):  # OpenAI bodies with one field wrong
        bad = rng.choice(chat_bad + [{"model": rng.choice(names)}, {"messages": [{"role": "user", "content": rng.choice(names)}], "max_tokens": 0}])
        cases.append(("POST", "/v1/chat/completions", js, json.dumps(good_chat | bad).encode()))
    for _ in range(50):  # headers: wrong content types, duplicated / odd auth, huge header values
        hdr = rng.choice([{**auth, "content-type": "application/json; charset=utf-16"}, {"Authorization": "Bearer " + "x" * 4000},
                          {"authorization": f"bearer {TOKEN}", "content-type": "application/xml"}, {"Authorization": f"Basic {TOKEN}"}])
        cases.append(("POST", rng.choice(posts), hdr, rng.choice([b"<a/>", b"{", rng.randbytes(20), b'{"title": 1}'])))
    for path in ("/v1/models", "/readyz", "/healthz", "/v1/analyze", "/docs/../v1/models"):  # methods no route has
        for method in ("PUT", "DELETE", "PATCH"):
            cases.append((method, path, js, None))
    return cases


def test_fuzz_malformed_requests_get_4xx_json_never_5xx(server):
    cases = _malformed(random.Random(20240726))
    assert len(cases) >= 500
    t0, statuses = time.monotonic(), []
    with requests.Session() as http:
        for method, path, headers, body in cases:
            r = http.request(method, server.url + path, headers=headers, data=body, timeout=30)
            statuses.append(r.status_code)
            assert 400 <= r.status_code < 500, (method, path, body[:200] if body else body, r.status_code, r.text[:300])
            assert set(r.json()) == {"error"} and r.json()["error"]["message"], r.text[:300]
            assert time.monotonic() - t0 < 480, "the fuzz exceeded its time budget"
    assert {401, 404, 405, 413, 422} <= set(statuses)


def test_replica_killed_then_restarted(server):
    """A killed replica is replaced; meanwhile clients get a retryable 503 (never a 500). The champion alias
    moved to another version before the kill: the new replica still serves the version pinned at deploy time."""
    import mlflow
    from mlflow import MlflowClient

    from newsray.tracking import use_store

    use_store(server.tracking_uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("newsray-news").experiment_id) as run:
        mlflow.log_artifacts(str(server.adapters["sports"]), "adapter")  # an AG News adapter: it would 422 on /v1/analyze
    client = MlflowClient()
    v2 = client.create_model_version("newsray-news", source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("newsray-news", "champion", v2.version)
    before = server.replica_pids()
    assert len(before) == 1, before
    os.kill(before[0], signal.SIGKILL)
    chat = {"model": CHAMPION, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deadline, last = time.monotonic() + 240, None
    while time.monotonic() < deadline:
        try:
            last = server.post("/v1/chat/completions", chat, timeout=60)
            if last.status_code == 200:
                break
            assert last.status_code == 503 and "error" in last.json(), last.text  # retryable JSON errors while restarting
            assert last.headers.get("Retry-After") == "5"  # and says when
        except requests.RequestException as e:
            last = e
        time.sleep(2)
    assert isinstance(last, requests.Response) and last.status_code == 200, f"no recovery: {last!r}"
    after = server.replica_pids()
    assert len(after) == 1 and after != before
    answer = server.post("/v1/analyze", ARTICLE).json()
    assert answer["company_names"] == ["Alpha"] and answer["model_ref"] == "models:/newsray-news/1", answer  # pinned, not v2


def test_ctrl_c_shuts_down_cleanly_and_token_never_logged(server):
    import psutil

    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert _stop(server.proc) == 0, server.log.read_text(errors="replace")[-3000:]
    assert f"stopped: {server.url}" in server.log.read_text(errors="replace")
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.pid for p in alive]
    logs = [server.log, *(p for p in server.ray_tmp.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt"))]
    assert len(logs) > 5
    leaked = [str(p) for p in logs if TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked
