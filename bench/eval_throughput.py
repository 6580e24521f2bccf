"""Evaluation throughput: the published one-at-a-time loop vs `newsray evaluate`, in one run.

(a) published method: a plain Python loop, one example at a time, the tokenizer's chat template,
    `model.generate(..., do_sample=False)` until EOS or max_new_tokens (model loaded once, not timed).
(b) newsray: `newsray.evaluate.pipeline.evaluate` (Ray Data actor pool, left-padded batches, JSON
    stop, parse, score, files, MLflow); timed end to end, actor start-up and model load included,
    Ray start excluded (a cluster is up before a job runs).
Same model (the config's base model, untrained), same data, same max_new_tokens, same torch
thread count. Runs alternate a, b, a, b, ... so machine load hits both alike; the table gives the
median examples/s of each and the ratio. Then it compares the greedy texts of (a) and (b) row by
row and explains each difference: (b)'s JSON stop ending a row earlier, or a greedy divergence
(its token position and the top-2 logit gap there, unbatched).

(b) runs at the config's eval.dtype (`auto`: bf16 where the CPU has it); pass `eval.dtype=model` for
the fp32 run whose text the comparison checks against (a). `--published-n K` times (a) on the first
K examples only (it is slow: about 0.1 ex/s) and compares the texts of those K rows.

    python bench/eval_throughput.py                      # the full run: 96 news examples, 256 tokens, 3 runs each
    python bench/eval_throughput.py --published-n 16 --runs 2 eval.dtype=model   # fp32, (a) on 16 rows
    python bench/eval_throughput.py --n 16 --max-new-tokens 64 --runs 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def published_loop(model, tokenizer, examples, max_new_tokens: int) -> tuple[float, list[str], list[list[int]]]:
    """(a): one example at a time, plain model.generate; returns (seconds, texts, new token ids)."""
    import torch

    texts, tokens = [], []
    t0 = time.perf_counter()
    for ex in examples:
        ids = tokenizer.apply_chat_template(ex.messages(), add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        tokens.append(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return time.perf_counter() - t0, texts, tokens


def explain(model, tokenizer, formatter, ex, a_tokens: list[int], b_text: str, b_reason: str) -> str:
    """Why (b)'s text differs from (a)'s: the JSON stop, or where greedy diverged and how close the call was."""
    import torch

    a_text = tokenizer.decode(a_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if b_reason == "json_end" and a_text.startswith(b_text):
        return f"JSON stop: (b) ended at the first closed object ({len(b_text)} chars), (a) went on ({len(a_text)} chars)"
    b_tokens = tokenizer(b_text, add_special_tokens=False)["input_ids"]
    k = next((i for i, (x, y) in enumerate(zip(a_tokens, b_tokens)) if x != y), min(len(a_tokens), len(b_tokens)))
    prefix = formatter.prompt_ids(ex.messages()) + a_tokens[:k]
    with torch.inference_mode():
        logits = model(torch.tensor([prefix])).logits[0, -1].float()
    top = torch.topk(logits, 2)
    gap = (top.values[0] - top.values[1]).item()
    return f"greedy divergence at new token {k}: unbatched top-2 logit gap {gap:.4f} (a near-tie flipped by batched numerics)"


def main(argv: list[str] | None = None) -> int:
    """Parse knobs, run a and b alternately, print the table and the text comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "news-smollm2-135m-cpu.yaml"))
    p.add_argument("--n", type=int, default=96, help="examples (first N of the test set)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="(b)'s eval.batch_size (default: the config's)")
    p.add_argument("--runs", type=int, default=3, help="runs of each method (median reported)")
    p.add_argument("--published-n", type=int, default=None, help="(a) on the first K examples only (default: all N)")
    p.add_argument("--json", default=None, help="also write the results here as JSON")
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides for (b)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import announce

    machine = announce()
    import torch

    from newsray.config import load_config
    from newsray.evaluate.pipeline import evaluate
    from newsray.formatting import Formatter
    from newsray.models import load_model, load_tokenizer
    from newsray.raycluster import init_ray
    from newsray.tasks import get_task

    tmp = Path(tempfile.mkdtemp(prefix="newsray-bench-"))
    overrides = [f"eval.limit={args.n}", f"eval.max_new_tokens={args.max_new_tokens}", f"tracking.run_dir={tmp / 'runs'}",
                 "eval.constrained=false", *([f"eval.batch_size={args.batch_size}"] if args.batch_size else []), *args.overrides]
    cfg = load_config(args.config, overrides)
    examples = get_task(cfg).load().test[: args.n]
    threads = max(1, math.ceil(cfg.eval.cpus_per_actor))  # the actor's thread count
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()
    formatter = Formatter.for_tokenizer(tokenizer, cfg.model.max_seq_length)
    ids = tokenizer.apply_chat_template(examples[0].messages(), add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == formatter.prompt_ids(examples[0].messages()), "the published prompt and newsray's differ"
    published = examples[: args.published_n or len(examples)]
    print(f"{len(examples)} {cfg.data.task} examples ((a) on {len(published)}), max_new_tokens={args.max_new_tokens}, "
          f"(b) batch_size={cfg.eval.batch_size} eval.dtype={cfg.eval.dtype}, "
          f"actors={cfg.eval.num_actors} x {cfg.eval.cpus_per_actor} CPU, torch threads={threads}, {os.cpu_count()} CPUs", flush=True)

    a_rates, b_rates, a_last, b_last = [], [], None, None
    for run in range(args.runs):
        secs, texts, toks = published_loop(model, tokenizer, published, args.max_new_tokens)
        a_rates.append(len(published) / secs)
        a_last = (texts, toks)
        print(f"run {run + 1}: (a) loop      {secs:8.1f} s  {a_rates[-1]:.3f} ex/s", flush=True)
        ray = init_ray(cfg)  # started per run, outside the timing (an idle Ray only waits to be disturbed)
        t0 = time.perf_counter()
        res = evaluate(cfg, "baseline", tmp / f"b-{run}")
        secs = time.perf_counter() - t0
        ray.shutdown()
        b_rates.append(len(examples) / secs)
        b_last = [json.loads(line) for line in (res.out_dir / "raw_outputs.jsonl").read_text().splitlines()]
        b_dtype = json.loads((res.out_dir / "eval_info.json").read_text())["dtype"]
        print(f"run {run + 1}: (b) newsray   {secs:8.1f} s  {b_rates[-1]:.3f} ex/s  (generation {res.aggregates['examples_per_s']:.3f} ex/s, "
              f"{b_dtype})", flush=True)

    a_med, b_med = statistics.median(a_rates), statistics.median(b_rates)
    print(f"\n| method | examples/s (median of {args.runs}) | runs |")
    print("|---|---|---|")
    print(f"| (a) published loop, batch 1 | {a_med:.3f} | {', '.join(f'{r:.3f}' for r in a_rates)} |")
    print(f"| (b) newsray evaluate ({b_dtype}) | {b_med:.3f} | {', '.join(f'{r:.3f}' for r in b_rates)} |")
    print(f"\nratio (b)/(a): {b_med / a_med:.2f}x")

    texts, toks = a_last
    diffs = []
    for ex, a_text, a_tok, b in zip(examples, texts, toks, b_last):
        if a_text != b["output"]:
            diffs.append({"id": b["id"], "item_id": ex.id, "reason": explain(model, tokenizer, formatter, ex, a_tok, b["output"], b["finish_reason"])})
    print(f"\ngreedy text (a) == (b): {len(published) - len(diffs)}/{len(published)} rows identical ((b) in {b_dtype})")
    for d in diffs:
        print(f"  row {d['id']} ({d['item_id']}): {d['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "a": a_rates, "b": b_rates, "ratio": b_med / a_med, "n": len(examples),
                                               "published_n": len(published), "b_dtype": b_dtype,
                                               "max_new_tokens": args.max_new_tokens, "batch_size": cfg.eval.batch_size,
                                               "differences": diffs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
