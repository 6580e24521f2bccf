"""What a runtime_env costs an in-process Ray: actor and task start times with and without one.

newsray's in-process Ray (`raycluster.init_ray` without an address) puts its worker variables
into the driver's environment, which the local raylet and its workers inherit, instead of a
job runtime_env: Ray does not hand its prestarted worker processes to a job whose runtime_env
is not empty, so every actor and task process is started for it. This measures both ways, each
in a fresh Ray, in alternating rounds (A B A B), on the same machine:

    python bench/ray_overhead.py --rounds 2 --actors 3

Prints the machine line, then per round: ray.init time, each actor's start-to-first-answer time
and one task's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def one(mode: str, actors: int) -> dict:
    import ray

    env = {"OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_DISABLE_TELEMETRY": "true"}
    kw = {"runtime_env": {"env_vars": env}} if mode == "runtime_env" else {}
    if mode == "environ":
        os.environ.update(env)
    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, **kw)
    out = {"mode": mode, "init_s": round(time.perf_counter() - t, 2), "actor_s": []}
    time.sleep(3)  # let Ray prestart its idle workers, as it does between a CLI's start and its first stage

    @ray.remote(num_cpus=1)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    for _ in range(actors):
        t = time.perf_counter()
        a = Probe.remote()
        ray.get(a.pid.remote())
        out["actor_s"].append(round(time.perf_counter() - t, 2))
        ray.kill(a)

    @ray.remote
    def task() -> int:
        return 1

    t = time.perf_counter()
    ray.get(task.remote())
    out["task_s"] = round(time.perf_counter() - t, 2)
    ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--actors", type=int, default=3)
    p.add_argument("--one", choices=["runtime_env", "environ"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.actors)))
        return
    from machine import announce

    announce()
    results = []
    for _ in range(a.rounds):
        for mode in ("runtime_env", "environ"):  # each in its own process: a fresh Ray and environment
            res = subprocess.run([sys.executable, __file__, "--one", mode, "--actors", str(a.actors)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    for mode in ("runtime_env", "environ"):
        rows = [r for r in results if r["mode"] == mode]
        actor = [s for r in rows for s in r["actor_s"]]
        print(f"{mode:12s} actor start mean {sum(actor) / len(actor):.2f} s, task {sum(r['task_s'] for r in rows) / len(rows):.2f} s")


if __name__ == "__main__":
    main()
