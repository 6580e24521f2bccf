"""What every benchmark prints first: the CPU model, its bf16 flags, what newsray decides from them, the load."""

from __future__ import annotations

import os
import sys


def describe() -> dict:
    """CPU model, bf16-relevant flags, newsray's native_bf16 decision, core count and load average."""
    from newsray.models import BF16_CPU_FLAGS, cpu_info, native_bf16

    model, flags = cpu_info()
    relevant = sorted(f for f in flags if f in BF16_CPU_FLAGS or f.startswith("amx") or f in {"avx512f", "avx512_vnni", "avx2"})
    return {"cpu": model, "flags": relevant, "native_bf16": native_bf16("cpu"), "cores": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def announce() -> dict:
    """Print the machine line on stderr and return it (benchmarks store it in their JSON)."""
    m = describe()
    print(f"machine: {m['cpu']} | {m['cores']} cores | flags {' '.join(m['flags']) or '-'} | native bf16: {m['native_bf16']} "
          f"| load {m['loadavg']}", file=sys.stderr, flush=True)
    return m
