"""Training throughput: the published recipe (TRL SFTTrainer) vs newsray's best CPU settings, and Ray's overhead.

Same model, data, LoRA settings, batch size, learning rate and number of steps in every arm; each
arm runs in its own subprocess (so its peak RSS is its own), one after the other:

  trl          the published recipe as one plain process: TRL SFTTrainer, batch 4, padding per
               batch, TRL's default gradient checkpointing, fp32 on CPU, completion-only loss
               (prompt-completion rows), AdamW (torch).
  fp32         newsray's worker loop in this process (newsray.train.driver.train_in_process, no Ray),
               fp32, no gradient checkpointing, the config's length-grouped batches
               (train.group_by_length) and completion-only logits (newsray.train.loss).
  bf16         the same with bf16 autocast (AMX): newsray's best CPU settings.
  bf16-ray     the same settings through Ray Train (newsray.train.train: in-process Ray, one
               TorchTrainer worker, MLflow logging, checkpoint at the end).

Reported per arm: trained (non-pad) tokens/s over the optimizer steps (sum of tokens / sum of step
times), the wall time of the whole call (model load included), peak RSS of the process (for
bf16-ray: the driver process only; the Ray worker runs in its own process, whose RSS is not
measured here), and the mean loss over the last 10 steps. Ratios: bf16 / trl tokens/s (target
>= 2x), bf16-ray vs bf16 wall (Ray's overhead, target <= 10% at 100 steps), and each arm's final
loss against trl's (speed must not cost quality).

    python bench/train_throughput.py --steps 30 --overhead-steps 100 --json runs/bench/train_throughput.json
    python bench/train_throughput.py --steps 5 --overhead-steps 5 --arms trl bf16      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
ARMS = ("trl", "fp32", "bf16", "bf16-ray")


def _cfg(args: argparse.Namespace, steps: int, tmp: Path, *extra: str) -> Any:
    from newsray.config import load_config

    return load_config(args.config, [f"train.max_steps={steps}", f"train.checkpoint_every_steps={steps}", "train.logging_steps=1",
                                     f"tracking.run_dir={tmp / 'runs'}", f"train.storage_path={tmp / 'ray'}", "data.val_fraction=0",
                                     *extra, *args.overrides])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arm_trl(args: argparse.Namespace, steps: int, tmp: Path) -> dict[str, Any]:
    """The published recipe: TRL SFTTrainer on prompt-completion rows (completion-only loss)."""
    import math

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from newsray.models import load_model, load_tokenizer
    from newsray.tasks import get_task

    cfg = _cfg(args, steps, tmp, "train.precision=fp32")
    t = cfg.train
    torch.set_num_threads(max(1, math.ceil(t.cpus_per_worker)))
    examples = get_task(cfg).load().train
    rows = Dataset.from_list([{"prompt": ex.messages(), "completion": [{"role": "assistant", "content": ex.answer}]} for ex in examples])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.times = 0.0, []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    sft = SFTConfig(output_dir=str(tmp / "trl"), max_steps=steps, per_device_train_batch_size=t.per_device_batch_size,
                    gradient_accumulation_steps=t.grad_accum_steps, learning_rate=t.learning_rate, warmup_steps=t.warmup_steps,
                    weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler, optim="adamw_torch", seed=t.seed,
                    use_cpu=True, bf16=False, max_length=cfg.model.max_seq_length, logging_steps=1, save_strategy="no",
                    report_to=[], dataloader_num_workers=0)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=sft, train_dataset=rows, processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = float(logs[-1]["num_tokens"])  # TRL counts attention-mask tokens, i.e. non-pad
    return {"steps": len(timer.times), "tokens": tokens, "step_s": sum(timer.times), "wall_s": wall,
            "losses": [float(h["loss"]) for h in logs], "gradient_checkpointing": bool(sft.gradient_checkpointing),
            "precision": "fp32"}


def arm_newsray(args: argparse.Namespace, steps: int, tmp: Path, precision: str, ray: bool) -> dict[str, Any]:
    """newsray's loop, in this process (train_in_process) or through Ray Train (train)."""
    from newsray.train import train
    from newsray.train.checkpoint import TrainerState
    from newsray.train.driver import train_in_process

    cfg = _cfg(args, steps, tmp, f"train.precision={precision}", "train.gradient_checkpointing=false")
    t0 = time.perf_counter()
    if ray:
        adapter = train(cfg).adapter_dir
    else:
        _, adapter = train_in_process(cfg, tmp / "local")
    wall = time.perf_counter() - t0
    hist = TrainerState.read(adapter).log_history  # one entry per step (train.logging_steps=1)
    tokens, secs = _newsray_tokens(cfg, hist)
    return {"steps": len(hist), "tokens": tokens, "step_s": secs, "wall_s": wall, "losses": [float(h["loss"]) for h in hist],
            "gradient_checkpointing": False, "precision": precision}


def _newsray_tokens(cfg: Any, hist: list[dict[str, Any]]) -> tuple[float, float]:
    """(non-pad tokens trained, seconds of optimizer steps) from the deterministic batches and per-step tokens/s."""
    from newsray.models import load_tokenizer
    from newsray.tasks import get_task
    from newsray.train.data import ShardedBatches, tokenize_examples

    data = tokenize_examples(cfg, get_task(cfg), load_tokenizer(cfg.model))
    batches = ShardedBatches(data.train, cfg.train.per_device_batch_size, 0, 1, cfg.train.seed, data.pad_id,
                             group_by_length=cfg.train.group_by_length)
    total_tokens, total_s, accum = 0.0, 0.0, cfg.train.grad_accum_steps
    for h in hist:
        k = int(h["step"]) - 1
        n = sum(int(batches.batch(k * accum + m)["attention_mask"].sum()) for m in range(accum))
        total_tokens += n
        total_s += n / h["tokens_per_s"]
    return total_tokens, total_s


def run_arm(name: str, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """Run one arm in a fresh subprocess; returns its JSON result."""
    with tempfile.TemporaryDirectory(prefix="newsray-trainbench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--config", args.config, "--_arm", name, "--_steps", str(steps), "--_out", str(out), *args.overrides]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def child(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="newsray-arm-") as tmp:
        name, steps, tmp_p = args._arm, args._steps, Path(tmp)
        if name == "trl":
            res = arm_trl(args, steps, tmp_p)
        else:
            res = arm_newsray(args, steps, tmp_p, "bf16" if name.startswith("bf16") else "fp32", ray=name.endswith("-ray"))
        res |= {"arm": name, "peak_rss_mib": _peak_rss_mib(), "tokens_per_s": res["tokens"] / res["step_s"]}
        Path(args._out).write_text(json.dumps(res))
    return 0


def _tail(losses: list[float], k: int = 10) -> tuple[float, float]:
    w = losses[-k:]
    return statistics.fmean(w), statistics.stdev(w) if len(w) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "news-smollm2-135m-cpu.yaml"))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of trl, fp32 and bf16")
    p.add_argument("--overhead-steps", type=int, default=100, help="steps of the bf16 vs bf16-ray pair (Ray's overhead)")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_arm", help=argparse.SUPPRESS)
    p.add_argument("--_steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides (all arms)")
    args = p.parse_args(argv)
    if args._arm:
        return child(args)

    print(f"{os.cpu_count()} CPUs; config {args.config}; {args.steps} steps (trl, fp32, bf16), "
          f"{args.overhead_steps} steps (bf16 vs bf16-ray)", flush=True)
    results: dict[str, dict[str, Any]] = {}
    plan = [(a, args.steps) for a in args.arms if a in ("trl", "fp32", "bf16")]
    if "bf16-ray" in args.arms:
        plan += [("bf16-overhead", args.overhead_steps)] if args.overhead_steps != args.steps or "bf16" not in args.arms else []
        plan += [("bf16-ray", args.overhead_steps)]
    for name, steps in plan:
        r = run_arm("bf16" if name == "bf16-overhead" else name, args, steps)
        results[name] = r
        print(f"{name:14s} {r['steps']:4d} steps  {r['tokens_per_s']:8.1f} tok/s  wall {r['wall_s']:7.1f} s  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  loss(last 10) {_tail(r['losses'])[0]:.4f}", flush=True)

    print("\n| arm | steps | precision | grad ckpt | tokens/s | wall s | peak RSS MiB | loss, mean of last 10 steps (sd) |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    for name, r in results.items():
        m, sd = _tail(r["losses"])
        print(f"| {name} | {r['steps']} | {r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['tokens_per_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {m:.4f} ({sd:.4f}) |")
    summary: dict[str, Any] = {}
    if "trl" in results and "bf16" in results:
        summary["speedup_bf16_vs_trl"] = results["bf16"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        print(f"\ntokens/s, newsray bf16 / published TRL recipe: {summary['speedup_bf16_vs_trl']:.2f}x")
    if "trl" in results and "fp32" in results:
        summary["speedup_fp32_vs_trl"] = results["fp32"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        print(f"tokens/s, newsray fp32 / published TRL recipe: {summary['speedup_fp32_vs_trl']:.2f}x")
    base = results.get("bf16-overhead") or results.get("bf16")
    if "bf16-ray" in results and base and base["steps"] == results["bf16-ray"]["steps"]:
        ray = results["bf16-ray"]
        summary["ray_overhead_wall"] = ray["wall_s"] / base["wall_s"] - 1
        summary["ray_overhead_step"] = base["tokens_per_s"] / ray["tokens_per_s"] - 1
        print(f"Ray Train overhead over {ray['steps']} steps: wall {100 * summary['ray_overhead_wall']:+.1f}%, "
              f"per-step throughput {100 * summary['ray_overhead_step']:+.1f}%")
    if "trl" in results:
        m0, sd0 = _tail(results["trl"]["losses"])
        for name in ("fp32", "bf16"):
            if name in results:
                m, sd = _tail(results[name]["losses"])
                summary[f"loss_delta_{name}_vs_trl"] = m - m0
                print(f"loss (mean of last 10 steps), {name} - trl: {m - m0:+.4f} (per-step sd: trl {sd0:.4f}, {name} {sd:.4f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary, "steps": args.steps,
                                               "overhead_steps": args.overhead_steps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
