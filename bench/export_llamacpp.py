"""An exported GGUF run by llama.cpp (llama-cpp-python) beside newsray's own generation, one prompt at a time.

Both arms get the same prompts as token ids (newsray's Formatter: the training prompt), decode
greedily up to --max-new-tokens, stop on the end-of-turn/EOS ids, and run with the same number
of threads, one after the other in this run:

  newsray    newsray.generation.load_generator(M).generate([messages], N) per prompt (fp32, merged
             adapter: what evaluation and serving run), plain decoding (no JSON grammar) but the
             news task's stop when the first JSON object closes.
  llama.cpp  the exported GGUF in llama-cpp-python (`Llama(model_path, n_threads)`, greedy
             `generate`), in a separate interpreter (--llama-python: a venv holding llama_cpp;
             never the project's venv), stopping at the same point: end-of-turn/EOS, or the
             token where newsray's JSON stop fired (so both arms decode the same number of tokens
             when their text agrees).

Printed: CPU model and flags (avx512_bf16, amx), load average, per-arm new tokens/s (sum of new
tokens / sum of per-prompt wall time, prefill included), model load time, and how many of the
greedy texts are identical, and whether llama.cpp tokenises the prompt text as the HF tokenizer does.

    python bench/export_llamacpp.py --model baseline --gguf runs/export/base/baseline-q8_0.gguf \\
        --llama-python /tmp/llama-venv/bin/python --n 16 --json runs/bench/export_llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _worker() -> None:
    """Runs under --llama-python: only llama_cpp and the standard library."""
    job = json.load(sys.stdin)
    from llama_cpp import Llama, __version__

    t0 = time.perf_counter()
    llm = Llama(model_path=job["gguf"], n_threads=job["threads"], n_threads_batch=job["threads"], n_ctx=job["n_ctx"],
                n_batch=512, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    stops = set(job["stop_ids"])
    rows = []
    for ids, limit, text in zip(job["prompts"], job["limits"], job["texts"]):
        same_tokens = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        out: list[int] = []
        t = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if tok in stops or len(out) >= limit:
                break
        rows.append({"tokens": out, "seconds": time.perf_counter() - t, "same_tokenisation": same_tokens})
    json.dump({"load_s": load_s, "version": __version__, "rows": rows}, sys.stdout)


def _cpu() -> tuple[str, list[str]]:
    model, flags = "unknown", []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            have = set(line.split(":", 1)[1].split())
            flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    return model, flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="baseline", help="what the GGUF was exported from (newsray's arm loads it)")
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--llama-python", required=True, help="an interpreter with llama-cpp-python installed")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--n", type=int, default=16, help="news test prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from newsray.config import load_config
    from newsray.generation import load_generator
    from newsray.tasks import get_task

    cpu, flags = _cpu()
    print(f"CPU: {cpu}; flags: {' '.join(flags) or 'none of avx2/avx512/amx'}; load average {os.getloadavg()[0]:.2f}", flush=True)
    cfg = load_config(args.config, [])
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    gen = load_generator(args.model, cfg, num_threads=args.threads)
    nr_load = time.perf_counter() - t0
    msgs = [e.messages() for e in get_task(cfg).load().test[: args.n]]
    gen.generate([msgs[0]], 4)  # warm-up
    ours = []
    for m in msgs:
        t = time.perf_counter()
        r = gen.generate([m], args.max_new_tokens)[0]
        ours.append((r, time.perf_counter() - t))
    job = {"gguf": str(args.gguf.resolve()), "threads": args.threads, "n_ctx": cfg.model.max_seq_length,
           "stop_ids": gen.stop_ids, "prompts": [gen.formatter.prompt_ids(m) for m in msgs],
           "texts": [gen.formatter.prompt(m) for m in msgs],
           "limits": [r.n_new_tokens if r.finish_reason == "json_end" else args.max_new_tokens for r, _ in ours]}
    here = Path(__file__).resolve()
    proc = subprocess.run([args.llama_python, str(here), "--worker"], input=json.dumps(job), capture_output=True, text=True,
                          check=False, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode:
        sys.exit(f"llama.cpp worker failed:\n{proc.stderr[-3000:]}")
    lc = json.loads(proc.stdout)
    decode = [gen.tokenizer.decode([t for t in row["tokens"] if t not in gen.stop_ids], skip_special_tokens=True)
              for row in lc["rows"]]
    same_text = sum(a == r.text for a, (r, _) in zip(decode, ours))
    nr_tok, nr_s = sum(r.n_new_tokens for r, _ in ours), sum(s for _, s in ours)
    lc_tok, lc_s = sum(len(row["tokens"]) for row in lc["rows"]), sum(row["seconds"] for row in lc["rows"])
    result = {
        "cpu": cpu, "flags": flags, "loadavg_end": os.getloadavg(), "prompts": len(msgs), "threads": args.threads,
        "max_new_tokens": args.max_new_tokens, "gguf": str(args.gguf), "llama_cpp_python": lc["version"],
        "newsray": {"new_tokens": nr_tok, "seconds": nr_s, "tok_per_s": nr_tok / nr_s, "load_s": nr_load},
        "llama_cpp": {"new_tokens": lc_tok, "seconds": lc_s, "tok_per_s": lc_tok / lc_s, "load_s": lc["load_s"]},
        "identical_greedy_text": same_text, "same_tokenisation": sum(r["same_tokenisation"] for r in lc["rows"]),
    }
    print(f"{'arm':10} {'new tokens':>10} {'seconds':>8} {'tok/s':>7} {'load s':>7}")
    for arm in ("newsray", "llama_cpp"):
        a = result[arm]
        print(f"{arm:10} {a['new_tokens']:>10} {a['seconds']:>8.1f} {a['tok_per_s']:>7.1f} {a['load_s']:>7.2f}")
    print(f"llama.cpp / newsray tok/s: {result['llama_cpp']['tok_per_s'] / result['newsray']['tok_per_s']:.2f}x; "
          f"identical greedy text {same_text}/{len(msgs)}; llama.cpp tokenises the prompt text as HF: "
          f"{result['same_tokenisation']}/{len(msgs)}; llama-cpp-python {lc['version']}; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    _worker() if sys.argv[1:] == ["--worker"] else main()
