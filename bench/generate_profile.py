"""Where a batched `Generator.generate` call spends its time, per weight dtype: prefill vs decode steps.

(The engine's forwards are timed: newsray.generation.engine.Engine._forward; a prefill is a forward
that writes prompts, a decode step one token per active slot.)

For each dtype, in one process with the same torch threads: N news test prompts generated one at a
time, then as one batch of N (constrained, greedy, the serving path's `generate`), timing every
forward call of the model. Reports the prefill (first forward) and the median decode step at batch
1 and at the full batch, the grammar-mask time, the totals and the ratio N singles / one batch:
the ceiling of what dynamic batching can gain in bench/serve_load.py, without Serve or HTTP.

    python bench/generate_profile.py                              # fp32 and bf16, 16 prompts, 1 thread (about 3 min)
    python bench/generate_profile.py --dtypes bfloat16 --batch 8 --threads 2
    python bench/generate_profile.py --dtypes float32 --op-profile 10   # + torch.profiler's operators over 10 full-batch decode steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def profile(dtype: str, batch: int, budget: int, threads: int, op_steps: int = 0) -> dict:
    """Time N single calls and one batch of N for one dtype (forward calls and grammar masks timed separately).

    op_steps > 0: torch.profiler also records decode steps 10 .. 10 + op_steps of the batch (all rows
    still active) and its operator table is printed.
    """
    from serve_load import articles
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from newsray.config import load_config
    from newsray.generation import load_generator
    from newsray.generation.grammar import TaskConstraint
    from newsray.tasks.news import PROMPT_TEMPLATE

    cfg = load_config(None, [f"model.dtype={dtype}"])
    gen = load_generator("baseline", cfg, num_threads=threads, slots=batch)
    messages = [[{"role": "user", "content": PROMPT_TEMPLATE.format(**a)}] for a in articles(cfg, batch + 1)[1:]]
    gen.generate(messages[:1], 8, constrained=True)  # warm-up: grammar compile, first-call costs

    calls: list[tuple[int, float]] = []  # (rows, seconds) of each forward call
    masks: list[float] = []
    engine = gen.engine
    forward, apply = engine._forward, TaskConstraint.apply

    ops = torch_profile(activities=[ProfilerActivity.CPU]) if op_steps else None
    profiling = {"on": False}  # only in the batched call

    def timed_forward(ids, *a, **k):
        step = len(calls)  # 0 = prefill
        if profiling["on"] and step == 10:
            ops.start()
        t0 = time.perf_counter()
        out = forward(ids, *a, **k)
        calls.append((ids.shape[0], time.perf_counter() - t0))
        if profiling["on"] and step == 9 + op_steps:
            ops.stop()
        return out

    def timed_apply(self, *a, **k):
        t0 = time.perf_counter()
        out = apply(self, *a, **k)
        masks.append(time.perf_counter() - t0)
        return out

    engine._forward, TaskConstraint.apply = timed_forward, timed_apply
    try:
        singles, single_prefill, single_steps = [], [], []
        t0 = time.perf_counter()
        for m in messages:
            calls.clear()
            singles.extend(gen.generate([m], budget, constrained=True))
            single_prefill.append(calls[0][1])
            single_steps += [dt for _, dt in calls[1:]]
        single_s, single_mask = time.perf_counter() - t0, sum(masks)
        calls.clear()
        masks.clear()
        profiling["on"] = ops is not None
        t0 = time.perf_counter()
        batched = gen.generate(messages, budget, constrained=True)
        batch_s = time.perf_counter() - t0
    finally:
        TaskConstraint.apply = apply
        del engine._forward  # the class's forward again
    if ops is not None:
        print(f"{dtype}: operators over decode steps 10-{9 + op_steps} of the batch of {batch} (self CPU time):")
        print(ops.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    full = [dt for rows, dt in calls[1:] if rows == batch]
    return {"dtype": dtype, "batch": batch, "threads": threads, "max_new_tokens": budget,
            "singles_s": single_s, "batch_s": batch_s, "ratio": single_s / batch_s,
            "single_prefill_s": statistics.median(single_prefill), "single_step_ms": 1000 * statistics.median(single_steps),
            "batch_prefill_s": calls[0][1], "batch_prefill_tokens": batch * max(len(gen.formatter.prompt_ids(m)) for m in messages),
            "batch_step_ms": 1000 * statistics.median(full) if full else None, "batch_mask_s": sum(masks), "singles_mask_s": single_mask,
            "new_tokens": sum(r.n_new_tokens for r in batched), "same_text": sum(a.text == b.text for a, b in zip(singles, batched))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=16, help="prompts: N single calls vs one batch of N")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a serving replica's cpus_per_replica)")
    p.add_argument("--op-profile", type=int, default=0, metavar="STEPS", help="also print torch.profiler's operator table for this many full-batch decode steps")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    results = [profile(d, args.batch, args.max_new_tokens, args.threads, args.op_profile) for d in args.dtypes]
    print(f"| dtype | {args.batch} singles s | batch of {args.batch} s | ratio | prefill 1 row s | prefill batch s (padded tokens) "
          "| decode step 1 row ms | decode step full batch ms | grammar masks in batch s | same text |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        step = f"{r['batch_step_ms']:.0f}" if r["batch_step_ms"] is not None else "-"
        print(f"| {r['dtype']} | {r['singles_s']:.1f} | {r['batch_s']:.1f} | {r['ratio']:.2f}x | {r['single_prefill_s']:.2f} | "
              f"{r['batch_prefill_s']:.2f} ({r['batch_prefill_tokens']}) | {r['single_step_ms']:.0f} | {step} | "
              f"{r['batch_mask_s']:.2f} | {r['same_text']}/{args.batch} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"loadavg": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
