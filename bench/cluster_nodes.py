"""What a node costs and brings: the same small runs on one node vs two (cluster/local.sh, loopback).

Two layouts of real `ray start` nodes, one after the other, each with a head of 0 CPUs for work,
the MLflow server and the S3 server of cluster/local.sh:

  1 node x 2 workers   one worker node with 2 CPUs: both Train workers (1 CPU each) on it
  2 nodes x 1 worker   two worker nodes with 1 CPU each: one Train worker per node (DDP over
                       gloo between the nodes, checkpoints to S3 either way)

Same training run in both (agnews rows, batch 1 per rank, fp32, --steps steps, one checkpoint
at the end, `newsray submit train`): trained tokens/s (mean over steps, newsray's own metric:
all ranks' tokens / the slowest rank's step time), the run's wall time (train_wall_s: Ray
Train's fit()) and the job's wall time (submission to result). Then, on the 2-node layout,
`newsray evaluate` of the baseline on --eval-rows test rows with 1 actor and with 2 actors
(0.6 CPU each: one per node): examples/s and wall time.

    python bench/cluster_nodes.py --steps 8 --eval-rows 8 --json runs/bench/cluster_nodes.json

Prints the CPU model and flags and the load average: on a shared 2-core machine, both layouts
share the same 2 cores, so this measures what splitting them over nodes costs, not what a
second machine brings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # localcluster: the Python driver of cluster/local.sh


def machine() -> dict[str, object]:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "loadavg": os.getloadavg()}


def _submit(cluster, stage: str, args: list[str], job_args: list[str] | None = None) -> tuple[dict, float]:
    from newsray.submit import submit

    logs: list[str] = []
    t0 = time.perf_counter()
    res = submit(stage, None, args, address=cluster.address, log=logs.append, job_args=job_args or [])
    wall = time.perf_counter() - t0
    if res.status != "SUCCEEDED":
        raise SystemExit(f"{stage} job {res.status}:\n{''.join(logs)[-3000:]}")
    return res.result, wall


def _env(cluster):
    for key in ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ[key] = cluster.exports[key]


def main() -> None:
    from localcluster import local_cluster

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-rows", type=int, default=8)
    p.add_argument("--data-root", default=os.environ.get("NEWSRAY_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    out: dict[str, object] = {"machine_start": machine(), "steps": args.steps, "eval_rows": args.eval_rows}
    print(json.dumps(out["machine_start"]), flush=True)
    base = ["data.task=agnews", f"data.root={args.data_root}", "model.max_seq_length=512"]
    train = base + [f"data.train_rows=[100,{100 + 4 * args.steps}]", "data.val_fraction=0", "train.per_device_batch_size=1",
                    "train.num_workers=2", "train.cpus_per_worker=1", "train.precision=fp32", "train.warmup_steps=0",
                    f"train.max_steps={args.steps}", f"train.checkpoint_every_steps={args.steps}", "train.logging_steps=1"]
    evaluation = base + [f"eval.limit={args.eval_rows}", "eval.batch_size=1", "eval.max_new_tokens=16", "eval.cpus_per_actor=0.6",
                         "model.dtype=float32"]
    with tempfile.TemporaryDirectory(prefix="nrbench-") as tmp:
        for layout, workers, cpus in (("1 node x 2 workers", 1, 2), ("2 nodes x 1 worker", 2, 1)):
            with local_cluster(Path(tmp) / f"state-{workers}", workers=workers, services=True, worker_cpus=cpus) as c:
                _env(c)
                res, job_wall = _submit(c, "train", train + [f"train.storage_path=s3://{c.bucket}/bench", f"tracking.run_dir={tmp}/runs{workers}"])
                state = json.loads((Path(res["adapter_dir"]) / "trainer_state.json").read_text())
                row = {"tokens_per_s": res["metrics"].get("tokens_per_s_mean"), "train_wall_s": res["metrics"]["train_wall_s"],
                       "job_wall_s": job_wall, "nodes_used": len({r["node_id"] for r in state["ranks"]}), "loadavg": os.getloadavg()}
                out[layout] = row
                print(layout, json.dumps(row), flush=True)
                if workers == 2:
                    for actors in (1, 2):
                        ev, wall = _submit(c, "evaluate", evaluation + [f"eval.num_actors={actors}", f"tracking.run_dir={tmp}/eval{actors}"],
                                           job_args=["--model", "baseline"])
                        erow = {"examples_per_s": ev["aggregates"]["examples_per_s"], "eval_wall_s": ev["wall_s"], "job_wall_s": wall,
                                "loadavg": os.getloadavg()}
                        out[f"evaluate {actors} actor(s)"] = erow
                        print(f"evaluate {actors} actor(s)", json.dumps(erow), flush=True)
    one, two = out["1 node x 2 workers"], out["2 nodes x 1 worker"]
    out["ratio_tokens_per_s_2nodes_over_1node"] = two["tokens_per_s"] / one["tokens_per_s"]
    out["ratio_examples_per_s_2actors_over_1"] = out["evaluate 2 actor(s)"]["examples_per_s"] / out["evaluate 1 actor(s)"]["examples_per_s"]
    out["machine_end"] = machine()
    print(json.dumps({k: out[k] for k in out if k.startswith("ratio")}), json.dumps(out["machine_end"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
