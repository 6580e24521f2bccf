"""cluster/local.sh driven by tests: free ports, start/stop, the client environment, killing a node."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port such that base .. base+n-1 are all free now (for the worker nodes' port blocks)."""
    for _ in range(200):
        base = free_port()
        if base + n >= 60000:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports found")


@dataclass
class LocalCluster:
    """A running `cluster/local.sh` cluster: its env (ports, state dir) and its addresses."""

    env: dict[str, str]
    state: Path
    workers: int
    services: bool
    exports: dict[str, str] = field(default_factory=dict)  # what `local.sh env` tells a client to export

    @property
    def address(self) -> str:  # the Jobs API
        return f"http://127.0.0.1:{self.env['NEWSRAY_DASHBOARD_PORT']}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.env['NEWSRAY_GCS_PORT']}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.env['NEWSRAY_MLFLOW_PORT']}"

    @property
    def bucket(self) -> str:
        return self.env["NEWSRAY_S3_BUCKET"]

    def sh(self, *args: str, timeout: float = 700, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", "cluster/local.sh", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(self.state.glob("*.log")))
            raise AssertionError(f"local.sh {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}{logs}")
        return r

    def pid(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text())

    def kill(self, name: str) -> list[int]:
        """SIGKILL a component (a worker node: `ray start`, its raylet and every process on that node)."""
        import psutil

        root = psutil.Process(self.pid(name))
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return [p.pid for p in procs]

    def s3(self):  # pyarrow's S3 filesystem on the cluster's S3 server
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.exports["AWS_ENDPOINT_URL"].removeprefix("http://"), scheme="http",
                                       access_key=self.exports["AWS_ACCESS_KEY_ID"], secret_key=self.exports["AWS_SECRET_ACCESS_KEY"],
                                       region=self.exports["AWS_DEFAULT_REGION"])

    def node_ids(self) -> dict[str, str]:
        """{'head' | 'worker-K': node id} of the alive nodes, from their naming resource (Ray's state API)."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000, raise_on_missing_output=False):
            for res in n.resources_total:
                if res == "newsray_head":
                    out["head"] = n.node_id
                elif res.startswith("newsray_worker_"):
                    out[f"worker-{res.removeprefix('newsray_worker_')}"] = n.node_id
        return out


def _parse_exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value.split()[0] if value else ""
    return out


@contextmanager
def local_cluster(state: Path, workers: int = 0, services: bool = False, head_cpus: int | None = None,
                  worker_cpus: int = 1) -> Iterator[LocalCluster]:
    """`cluster/local.sh start` on free ports (a Ray temp dir of its own); stopped (only its processes) at the end."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="nrray-", dir="/tmp"))  # AF_UNIX socket paths must stay < 108 bytes
    agent = free_port_block(4)
    env = {**os.environ, "NEWSRAY_GCS_PORT": str(free_port()), "NEWSRAY_DASHBOARD_PORT": str(free_port()),
           "NEWSRAY_AGENT_PORT": str(agent), "NEWSRAY_WORKER_PORT_BASE": str(free_port_block(10 * (workers + 2))),
           "NEWSRAY_MLFLOW_PORT": str(free_port()), "NEWSRAY_S3_PORT": str(free_port()), "NEWSRAY_S3_BUCKET": "newsray",
           "NEWSRAY_WORKER_CPUS": str(worker_cpus), "NEWSRAY_CLUSTER_DIR": str(state), "NEWSRAY_RAY_TEMP_DIR": str(ray_tmp),
           "RAY_AUTH_MODE": "token", "VENV_BIN": str(Path(sys.executable).parent)}
    if head_cpus is not None:
        env["NEWSRAY_NUM_CPUS"] = str(head_cpus)
    cluster = LocalCluster(env, state, workers, services)
    try:
        args = ["start", "--workers", str(workers)] + ([] if services else ["--no-services"])
        out = cluster.sh(*args).stdout
        cluster.exports = _parse_exports(out)
        yield cluster
    finally:
        subprocess.run(["bash", "cluster/local.sh", "stop"], cwd=REPO, env=env, timeout=300)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for(what: str, check, timeout_s: float = 600, every_s: float = 2.0):
    """Poll `check()` until it returns something truthy; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
