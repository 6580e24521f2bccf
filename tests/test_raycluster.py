"""In-process Ray as every stage starts it: explicit auth mode, sized by the config, env propagated."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os
    from newsray.config import load_config
    from newsray.raycluster import init_ray
    ray = init_ray(load_config(None, ["ray.num_cpus=2", "ray.object_store_memory_mb=256"]))

    @ray.remote(num_cpus=0.5)
    def probe():
        return {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "MLFLOW_DISABLE_TELEMETRY", "RAY_AUTH_MODE")}

    print(json.dumps({"cpus": ray.cluster_resources()["CPU"], "worker": ray.get(probe.remote()),
                      "mode": os.environ["RAY_AUTH_MODE"]}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_in_process_ray_with_token_auth(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "token"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert out["cpus"] == 2 and out["mode"] == "token"
    assert out["worker"]["OMP_WAIT_POLICY"] == "PASSIVE" and out["worker"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    token = home / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text()) == 64 and (token.stat().st_mode & 0o777) == 0o600
