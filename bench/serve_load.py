"""Serve load test: continuous batching vs batch size 1, and Serve's overhead on one request, in one run.

Two copies of the app run side by side on one in-process Ray (loopback only): `batched`
(serve.max_batch_size = --batch-size: the engine's slots; a request joins the running batch at
the next step) and `single` (max_batch_size 1), each with one model replica of --cpus CPUs
(torch threads = CPUs). For each concurrency level (closed loop: C client
threads, each sending its next request when the previous one returns) the two apps are measured
back to back in --rounds rounds, ABBA order, so drifting machine load hits both alike: p50/p95/p99
latency and requests/s over all rounds, and the median over rounds of the per-round req/s ratio.
Requests are POST /v1/analyze with the news test items (serve.constrained=true: one generation
per request, always schema-valid). Then Serve's overhead: the same single request over HTTP
(to `single`, idle) vs the bare `Generator.generate` call in this process with the same threads,
alternated --overhead-reps times; medians and the relative overhead.

    python bench/serve_load.py                                   # the full run (about 10-15 min on 2 CPUs)
    python bench/serve_load.py --levels 1 4 --requests 1 --rounds 1 --overhead-reps 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_ITEM = re.compile(r"Title: (?P<title>.*?)\nContent: (?P<content>.*?)\n\nProvide a JSON response", re.S)


def articles(cfg, n: int) -> list[dict[str, str]]:
    """Title/content of the first n news test items (from their published prompts)."""
    from newsray.tasks import get_task

    test = get_task(cfg).load().test
    items = [m.groupdict() for m in (_ITEM.search(e.user) for e in test) if m]
    return [items[i % len(items)] for i in range(n)]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation), in the values' unit."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def load_level(url: str, items: list[dict[str, str]], concurrency: int, budget: int) -> dict[str, float]:
    """Closed-loop load: `concurrency` clients share `items`; latencies (s) and requests/s."""
    import requests

    lock, queue, lat, errors = threading.Lock(), list(items), [], []

    def client() -> None:
        with requests.Session() as http:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/analyze", json=body | {"max_new_tokens": budget}, timeout=1800)
                dt = time.perf_counter() - t0
                with lock:
                    (lat if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.status_code)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    return summarize(concurrency, [{"latencies": lat, "errors": len(errors), "wall_s": wall}])


def summarize(concurrency: int, runs: list[dict]) -> dict:
    """Requests/s (all requests / all wall time) and latency percentiles over one or more runs."""
    lat = [x for r in runs for x in r["latencies"]]
    wall = sum(r["wall_s"] for r in runs)
    return {"concurrency": concurrency, "requests": len(lat) + sum(r["errors"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "wall_s": wall, "rps": len(lat) / wall, "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "p99_s": pct(lat, 99), "latencies": lat}


def overhead(url: str, gen, item: dict[str, str], budget: int, reps: int) -> dict[str, float]:
    """Same request over HTTP vs bare Generator.generate, alternated; medians (s) and relative overhead."""
    import requests

    from newsray.tasks.news import PROMPT_TEMPLATE

    messages = [{"role": "user", "content": PROMPT_TEMPLATE.format(**item)}]
    http_s, server_s, bare_s, tokens = [], [], [], set()
    with requests.Session() as http:
        for _ in range(reps):
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/analyze", json=item | {"max_new_tokens": budget}, timeout=600)
            http_s.append(time.perf_counter() - t0)
            r.raise_for_status()
            server_s.append(r.json()["latency_ms"] / 1000)  # time inside the ingress (handle call, batching, generate)
            t0 = time.perf_counter()
            out = gen.generate([messages], budget, constrained=True)
            bare_s.append(time.perf_counter() - t0)
            tokens.add(out[0].n_new_tokens)
    h, b = statistics.median(http_s), statistics.median(bare_s)
    return {"reps": reps, "http_median_s": h, "ingress_median_s": statistics.median(server_s), "bare_median_s": b,
            "overhead_s": h - b, "overhead_pct": 100 * (h - b) / b, "http_min_s": min(http_s), "bare_min_s": min(bare_s),
            "overhead_min_pct": 100 * (min(http_s) - min(bare_s)) / min(bare_s), "new_tokens": sorted(tokens)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="newsray config (default: built-in defaults = news + embedded SmolLM2)")
    p.add_argument("--model", default="baseline", help="baseline, an adapter dir or an MLflow URI")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 16, 32, 64], help="client concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests per level and round = max(4, this x concurrency)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per level, modes in ABBA order")
    p.add_argument("--batch-size", type=int, default=64, help="max_batch_size (engine slots) of the batched app")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per request")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs (= torch threads) per model replica")
    p.add_argument("--overhead-reps", type=int, default=7, help="alternated HTTP / bare pairs for the overhead")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="newsray config override, e.g. serve.dtype=model (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import announce

    machine = announce()
    from newsray.config import load_config

    common = ["serve.host=127.0.0.1", f"serve.port={args.port}", "serve.constrained=true", f"serve.max_new_tokens={args.max_new_tokens}",
              f"serve.cpus_per_replica={args.cpus}", "serve.auth_token_env=null", "serve.auth_token_file=null", "ray.address=null",
              f"ray.num_cpus={math.ceil(2 * args.cpus)}", *args.overrides]  # both replicas fit; only one is busy at a time
    os.environ.pop("RAY_ADDRESS", None)  # loopback only: never a remote cluster
    cfg = load_config(args.config, common)
    cfgs = {"batched": load_config(args.config, common + [f"serve.max_batch_size={args.batch_size}"]),
            "single": load_config(args.config, common + ["serve.max_batch_size=1"])}
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)  # Ray reads it when imported (see init_ray)
    from ray import serve

    from newsray.serving import build_app, served_spec

    from newsray.generation import load_generator
    from newsray.raycluster import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    urls = {}
    for name, c in cfgs.items():
        serve.run(build_app(c, args.model), name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{args.port}/{name}"
    print(f"apps ready in {time.perf_counter() - t0:.0f}s: {urls}", file=sys.stderr)
    items = articles(cfg, max(4, args.requests * max(args.levels)) + 1)
    from newsray.models import resolve_dtype

    spec = served_spec(args.model, cfg)  # as a replica loads it (resolved once: an MLflow URI downloads)
    dtype = str(resolve_dtype(spec.model.dtype, "cpu")).removeprefix("torch.")
    print(f"serving {args.model} in {dtype} (serve.dtype={cfg.serve.dtype})", file=sys.stderr)
    results: dict = {"machine": machine | {"loadavg_start": os.getloadavg()}, "dtype": dtype,
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "levels": {"batched": [], "single": []}}
    try:
        for name, url in urls.items():  # warm-up: grammar compile, first-call costs
            load_level(url, items[:1], 1, args.max_new_tokens)
        results["ratios"] = []
        for c in args.levels:
            n = max(4, args.requests * c)
            runs: dict[str, list[dict]] = {name: [] for name in urls}
            for rnd in range(args.rounds):  # ABBA order: drift in machine load hits both modes alike
                for name in (list(urls) if rnd % 2 == 0 else list(urls)[::-1]):
                    r = load_level(urls[name], items[1:n + 1], c, args.max_new_tokens)
                    runs[name].append(r)
                    print(f"{name:8s} c={c:3d} round {rnd} n={n:3d} rps={r['rps']:.3f} p50={r['p50_s']:.2f}s p95={r['p95_s']:.2f}s "
                          f"errors={r['errors']} load={os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            for name in urls:
                results["levels"][name].append(summarize(c, runs[name]))
            per_round = [b["rps"] / s["rps"] for b, s in zip(runs["batched"], runs["single"])]
            results["ratios"].append({"concurrency": c, "per_round": per_round, "median": statistics.median(per_round)})
        gen = load_generator(args.model, cfg, num_threads=args.cpus, spec=spec)
        gen.generate([[{"role": "user", "content": "warm up"}]], 4, constrained=True)
        results["overhead"] = overhead(urls["single"], gen, items[0], args.max_new_tokens, args.overhead_reps)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    results["machine"]["loadavg_end"] = os.getloadavg()
    report(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


def report(results: dict) -> None:
    """Print the tables (Markdown, ready for docs/BENCHMARKS.md)."""
    print(f"Weights in {results['dtype']}.")
    print()
    print("| concurrency | mode | requests | req/s | p50 s | p95 s | p99 s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    single = {r["concurrency"]: r for r in results["levels"]["single"]}
    for r in results["levels"]["batched"]:
        for mode, x in (("batched", r), ("batch size 1", single[r["concurrency"]])):
            print(f"| {x['concurrency']} | {mode} | {x['requests']} | {x['rps']:.3f} | {x['p50_s']:.2f} | {x['p95_s']:.2f} | {x['p99_s']:.2f} | {x['errors']} |")
    print()
    print("| concurrency | req/s ratio batched / batch size 1 (median of rounds) | per round |")
    print("|---|---|---|")
    for r in results["ratios"]:
        print(f"| {r['concurrency']} | {r['median']:.2f}x | {', '.join(f'{x:.2f}x' for x in r['per_round'])} |")
    o = results.get("overhead")
    if o:
        print()
        print(f"Single request, median of {o['reps']}: HTTP via Serve {o['http_median_s']:.3f} s (of which inside the ingress "
              f"{o['ingress_median_s']:.3f} s), bare generate {o['bare_median_s']:.3f} s: overhead {o['overhead_s'] * 1000:.0f} ms "
              f"({o['overhead_pct']:+.1f}%); best of {o['reps']}: {o['http_min_s']:.3f} s vs {o['bare_min_s']:.3f} s "
              f"({o['overhead_min_pct']:+.1f}%); new tokens {o['new_tokens']}")


if __name__ == "__main__":
    main()
