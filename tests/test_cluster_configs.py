"""The configs that leave this machine (cluster/): launcher YAMLs, KubeRay manifests, Dockerfile.

Nothing here reaches a cloud or a Kubernetes API. What is checked for real:
- the launcher YAMLs against the schema in the installed Ray wheel (ray/autoscaler/ray-schema.json)
  and Ray's own config preparation and checks (`prepare_config` / `validate_config`);
- the KubeRay manifests against the v1 openAPIV3Schema of the vendored KubeRay v1.7.0 CRDs (hashes
  checked first), with the Kubernetes extensions applied as the API server applies them (see
  `k8s_validator`), plus the operator's own creation-time checks that matter here;
- that what they name exists: the job entrypoint and config in the image (Dockerfile COPY lines),
  a config that loads with the entrypoint's overrides, the Serve import path importable and its
  args accepted, the serve config valid for Ray Serve, and the MLflow server command accepted by
  mlflow 3.17.2 with the Host header the Ray pods will send.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = KUBERAY / "crds"
IMAGE_ROOT = "/home/ray/newsray"  # WORKDIR of cluster/Dockerfile: where COPY puts the repo's files

# KubeRay v1.7.0 (commit 59d663ae): sha256 of each uncompressed CRD, as in crds/README.md.
CRD_SHA256 = {
    "RayCluster": ("ray.io_rayclusters.yaml.gz", "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"),
    "RayJob": ("ray.io_rayjobs.yaml.gz", "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"),
    "RayService": ("ray.io_rayservices.yaml.gz", "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"),
}
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
LAUNCHERS = ("aws.yaml", "gcp.yaml")


def _pinned_ray() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


# --- Kubernetes schema semantics on top of JSON Schema -------------------------------------------

def _k8s_schema(node):
    """An openAPIV3Schema (structural, as controller-gen writes it) as JSON Schema, with the API
    server's create-time semantics:

    - unknown fields are errors: an object schema with `properties` and no `additionalProperties`
      is closed, as with kubectl's default strict field validation (the API server would prune
      or, under `--validate=strict`, reject them), unless `x-kubernetes-preserve-unknown-fields`;
    - `nullable: true` admits null (OpenAPI 3.0);
    - `x-kubernetes-int-or-string` is `anyOf: [integer, string]` (controller-gen already writes the
      anyOf; added where missing). `pattern` then applies to the string form only, as in k8s;
    - `x-kubernetes-list-type: map|set` is checked by the validator below (keys / items unique);
    - `format` (int32, int64, date-time) is not enforced; `x-kubernetes-validations` (CEL rules: in
      these CRDs, immutability `self == oldSelf` and managedBy's allowed values) are not evaluated:
      no CEL interpreter here. The manifests set no field those rules govern (asserted below).
    """
    if isinstance(node, list):
        return [_k8s_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _k8s_schema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list of type set: {instance}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
        dup = {k for k in seen if seen.count(k) > 1}
        if dup:
            yield jsonschema.ValidationError(f"duplicate {keys} in a list of type map: {sorted(dup)}")


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


def _crd(kind: str) -> dict:
    name, digest = CRD_SHA256[kind]
    raw = gzip.decompress((CRDS / name).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == digest, f"{name} is not the vendored KubeRay v1.7.0 file"
    return yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB: libyaml when present


@functools.cache
def k8s_validator(kind: str):
    crd = _crd(kind)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return K8sValidator(_k8s_schema(v1["schema"]["openAPIV3Schema"]))


def _errors(validator, doc) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"[:300] for e in validator.iter_errors(doc))


def _manifest(kind: str) -> dict:
    return copy.deepcopy(_manifest_cached(kind))


@functools.cache
def _manifest_cached(kind: str) -> dict:
    return yaml.safe_load((KUBERAY / MANIFESTS[kind]).read_text())


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def _containers(cluster_spec: dict) -> list[dict]:
    return [c for p in _pod_specs(cluster_spec) for c in p.get("initContainers", []) + p["containers"]]


def _ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for param in start.params for opt in param.opts}


# --- Ray cluster launcher ---------------------------------------------------------------------------

def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_matches_rays_schema_and_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    validator = jsonschema.Draft7Validator(_ray_schema())
    assert _errors(validator, cfg) == []
    validate_config(cfg)  # Ray's checks beyond the schema (head type listed, min_workers <= max_workers)
    prepared = prepare_config(copy.deepcopy(cfg))  # merged with the provider's defaults.yaml, as `ray up` does
    validate_config(prepared)

    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    (gpu,) = workers
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= cfg["max_workers"], "an autoscaling GPU group"
    if cfg["provider"]["type"] == "aws":
        assert gpu["node_config"]["InstanceType"].startswith(("g", "p")), "an EC2 GPU instance type"
        assert "IamInstanceProfile" in gpu["node_config"], "workers write checkpoints to S3 themselves"
    else:
        assert gpu["resources"].get("GPU", 0) >= 1, "GCE node resources are not auto-detected"
        assert "serviceAccounts" in gpu["node_config"], "workers write checkpoints to GCS themselves"

    # Token auth on every node, with the token copied from this machine.
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for cmd in cfg["head_start_ray_commands"][-1:] + cfg["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
        flags = {t.split("=", 1)[0] for t in shlex.split(cmd.split("ray start", 1)[1]) if t.startswith("--")}
        assert flags <= _ray_start_options(), f"not `ray start` options: {flags - _ray_start_options()}"
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # The image is the one cluster/Dockerfile builds and the KubeRay manifests name.
    assert cfg["docker"]["image"] == _kuberay_image()


def test_launcher_schema_rejects_a_broken_config():
    """The validation above can fail: a typo'd key and a string where Ray wants a number."""
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["ray.worker.gpu"]["max_worker"] = bad["available_node_types"]["ray.worker.gpu"].pop("max_workers")
    bad["idle_timeout_minutes"] = "ten"
    errors = _errors(jsonschema.Draft7Validator(_ray_schema()), bad)
    assert any("max_worker" in e for e in errors) and any("idle_timeout_minutes" in e for e in errors), errors


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_data_copy_command_runs(name, tmp_path):
    """The setup command that fetches the data onto each node, run here with a local source."""
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    (cmd,) = [c for c in cfg["setup_commands"] if "copy_files" in c]
    src = tmp_path / "bucket" / "data"
    (src / "news").mkdir(parents=True)
    (src / "news" / "news_train_data.jsonl").write_text('{"x": 1}\n')
    env = os.environ | {"NEWSRAY_DATA_URI": src.as_uri(), "NEWSRAY_DATA_DIR": str(tmp_path / "node")}
    subprocess.run(["bash", "-c", cmd.replace("python ", f"{shlex.quote(sys.executable)} ", 1)], env=env, check=True, timeout=120)
    assert (tmp_path / "node" / "news" / "news_train_data.jsonl").read_text() == '{"x": 1}\n'
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "NEWSRAY_DATA_URI=" in run_options and "NEWSRAY_DATA_DIR=/home/ray/data" in run_options


# --- KubeRay ----------------------------------------------------------------------------------------

def _kuberay_image() -> str:
    images = {c["image"] for kind in MANIFESTS for c in _containers(_cluster_spec(_manifest(kind)))}
    assert len(images) == 1, f"one image for every pod: {images}"
    return images.pop()


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_kuberay_manifest_matches_the_crd(kind):
    doc = _manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert _errors(k8s_validator(kind), doc) == []


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_kuberay_manifest_passes_the_operators_checks(kind):
    """The KubeRay v1.7.0 operator's create-time checks (controllers/ray/utils/validation.go) that apply."""
    doc = _manifest(kind)
    name = doc["metadata"]["name"]
    limit = 53 if kind == "RayCluster" else 47  # MaxRayClusterNameLength, MaxRayJob/ServiceNameLength
    assert len(name) <= limit and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), "a DNS-1035 label"
    spec = _cluster_spec(doc)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        unknown = {f"--{k}" for k in params} - _ray_start_options()  # KubeRay passes each as --key=value
        assert not unknown, f"rayStartParams that `ray start` does not take: {unknown}"
    for g in groups:
        assert g["template"]["spec"]["containers"]
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    # Token auth needs rayVersion >= 2.52.0; it must also be the Ray the image installs.
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
    assert spec["rayVersion"] == _pinned_ray()
    assert spec["enableInTreeAutoscaling"] is True
    # CEL-governed fields (not evaluated by the schema check) are left unset.
    assert "managedBy" not in doc["spec"] and "managedBy" not in spec and "gcsFaultToleranceOptions" not in spec
    if kind == "RayJob":
        assert doc["spec"]["entrypoint"].strip()
        assert "clusterSelector" not in doc["spec"]
        assert doc["spec"]["shutdownAfterJobFinishes"] or "ttlSecondsAfterFinished" not in doc["spec"]
    if kind == "RayService":
        assert "name" not in spec["headGroupSpec"].get("headService", {}).get("metadata", {})


def test_crd_validation_rejects_broken_manifests():
    """The CRD check can fail: unknown fields, wrong types, a duplicate env name, a bad quantity."""
    validator = k8s_validator("RayCluster")
    doc = _manifest("RayCluster")
    cases = {
        "workerGroupSpecs/0": lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=4),  # typo
        "minReplicas": lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="0"),
        "rayStartParams": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 2}),
        "env": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "NEWSRAY_DATA_DIR", "value": "/elsewhere"}),
        "limits": lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="32 GB"),
        "mode": lambda d: d["spec"]["authOptions"].update(mode="tokens"),
    }
    for where, breaks in cases.items():
        bad = copy.deepcopy(doc)
        breaks(bad)
        errors = _errors(validator, bad)
        assert any(where in e for e in errors), (where, errors)


def test_kuberay_pods_agree():
    """The three manifests run the same pods: image, env, auth, service account, GPU requests."""
    names = [_manifest(kind)["metadata"]["name"] for kind in MANIFESTS]
    assert len(set(names)) == len(names), "distinct names: KubeRay names each head Service <name>-head-svc"
    assert len({_manifest(kind)["metadata"]["namespace"] for kind in MANIFESTS}) == 1
    specs = {kind: _cluster_spec(_manifest(kind)) for kind in MANIFESTS}
    first = specs["RayCluster"]
    for kind, spec in specs.items():
        for key in ("rayVersion", "authOptions", "headGroupSpec", "workerGroupSpecs"):
            assert spec[key] == first[key], f"{kind}: {key} differs from raycluster.yaml"
    for pod in _pod_specs(first):
        assert pod["serviceAccountName"] == "newsray"
    (worker,) = first["workerGroupSpecs"]
    res = worker["template"]["spec"]["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    head = first["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head is a CPU pod"
    envs = {e["name"]: e for e in head["env"]}
    assert envs["MLFLOW_TRACKING_URI"]["value"].startswith("http://"), "an MLflow server, not SQLite"


def _image_files() -> set[str]:
    """Repository paths the Dockerfile COPYs into IMAGE_ROOT (files and directories)."""
    text = (CLUSTER / "Dockerfile").read_text()
    copied = set()
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"]:
            srcs = [p for p in parts[1:-1] if not p.startswith("--")]
            for src in srcs:
                assert (REPO / src).exists(), f"cluster/Dockerfile copies {src}, which is not in the repository"
                copied.add(src.rstrip("/"))
    return copied


def _in_image(path: str) -> Path:
    """A path in the image under IMAGE_ROOT -> the repository file it was copied from."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not under the image's {IMAGE_ROOT}"
    rel = path[len(IMAGE_ROOT) + 1:]
    assert rel.split("/")[0] in _image_files(), f"{rel} is not copied into the image by cluster/Dockerfile"
    assert (REPO / rel).is_file(), f"{rel} does not exist in the repository"
    return REPO / rel


def test_dockerfile_installs_newsray_with_gpu_extras():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.MULTILINE)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{_pinned_ray()}-py311-cu"), "Ray's CUDA image of the pinned Ray / Python 3.11"
    assert re.search(r"pip install .*\"\.\[gpu\]\"", text), "newsray with the gpu extras"
    assert "download.pytorch.org/whl/cu" in text, "a CUDA build of PyTorch"
    assert re.search(r"^WORKDIR " + re.escape(IMAGE_ROOT) + "$", text, re.MULTILINE)
    assert {"pyproject.toml", "newsray", "jobs", "configs", "serve"} <= _image_files()
    # The image named everywhere is this Dockerfile's documented tag.
    assert f"-t {_kuberay_image()} " in text


def test_rayjob_entrypoint_runs_a_stage_with_a_loadable_config():
    from newsray.config import load_config
    from newsray.submit import stages

    argv = shlex.split(_manifest("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = _in_image(argv[1])
    assert script.parent.name == "jobs" and script.stem in stages()
    assert argv[2] == "--config"
    config = _in_image(argv[3])
    overrides = argv[4:]
    cfg = load_config(config, overrides)  # a bad override or key fails here, as it would on the cluster
    assert cfg.train.storage_path.startswith(("s3://", "gs://")), "checkpoints in object storage every node sees"
    assert cfg.train.use_gpu


def test_rayservice_serve_config_deploys_newsrays_app_on_the_champion():
    from ray.serve.schema import ServeDeploySchema

    from newsray.config import load_config

    serve_cfg = yaml.safe_load(_manifest("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # what `serve deploy` / KubeRay send to the Serve API
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    args_model = importlib.import_module(module).AppArgs
    args = args_model.model_validate(app["args"])
    assert args.model == "models:/newsray-news@champion"
    cfg = load_config(_in_image(args.config), args.overrides)
    assert cfg.serve.auth_token_env == "NEWSRAY_API_TOKEN"
    env_names = {e["name"] for e in _cluster_spec(_manifest("RayService"))["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert "NEWSRAY_API_TOKEN" in env_names, "the bearer token the app reads is in the pods' env"
    # The same deployments as serve/config.yaml, with a GPU per model replica.
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    names = lambda c: [d["name"] for d in c["applications"][0]["deployments"]]
    assert names(serve_cfg) == names(local)
    model_dep = next(d for d in app["deployments"] if d["name"] == "NewsrayModel")
    assert model_dep["ray_actor_options"]["num_gpus"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_mlflow_manifest_command_serves_the_ray_pods_host(tmp_path):
    """Start mlflow.yaml's own server command (storage swapped for temp dirs, loopback port): the
    Host header the Ray pods send (MLFLOW_TRACKING_URI's host:port) is accepted, another refused."""
    docs = list(yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()))
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == _kuberay_image()
    head = _cluster_spec(_manifest("RayCluster"))["headGroupSpec"]["template"]["spec"]["containers"][0]
    uri = next(e["value"] for e in head["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    netloc = urlparse(uri).netloc
    assert netloc == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}"

    port = _free_port()
    swap = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
            "--backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination": str(tmp_path / "artifacts")}
    argv = []
    for arg in container["command"][2:]:
        key = arg.split("=", 1)[0]
        argv.append(f"{key}={swap[key]}" if key in swap else arg)
    assert set(swap) <= {a.split("=", 1)[0] for a in argv}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(tmp_path / "mlflow.log", "w") as log:
        proc = subprocess.Popen([str(mlflow_bin), "server", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        deadline = time.monotonic() + 180
        while True:
            try:
                if _get(f"http://127.0.0.1:{port}/health", f"127.0.0.1:{port}") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)
        assert _get(api, netloc) == 200
        assert _get(api, "evil.example:5000") == 403
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_gpu_workers_fit_the_gpu_recipe():
    """A GPU worker (GCE's declared resources, the KubeRay worker pod) holds one Train worker, one
    evaluation actor and one Serve model replica of the GPU recipe: none would wait forever."""
    from newsray.config import load_config

    cfg = load_config(REPO / "configs" / "news-llama3.2-1b-gpu.yaml", [])
    serve_cfg = yaml.safe_load(_manifest("RayService")["spec"]["serveConfigV2"])
    replica = next(d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == "NewsrayModel")["ray_actor_options"]
    needs = [(cfg.train.cpus_per_worker, 1 if cfg.train.use_gpu else 0), (cfg.eval.cpus_per_actor, cfg.eval.gpus_per_actor),
             (replica["num_cpus"], replica["num_gpus"])]
    gce = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())["available_node_types"]["ray_worker_gpu"]["resources"]
    (worker,) = _cluster_spec(_manifest("RayCluster"))["workerGroupSpecs"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod = {"CPU": float(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])}  # KubeRay sizes Ray from the limits
    for node in (gce, pod):
        for cpus, gpus in needs:
            assert cpus <= node["CPU"] and gpus <= node["GPU"], (node, cpus, gpus)
