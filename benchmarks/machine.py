"""The machine a benchmark ran on: CPU model, core count and the ISA features that decide TensorFlow's kernels."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """{cpu, cores, isa} of this machine (isa: which of FEATURES the CPU reports)."""
    text = cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return {"cpu": model, "cores": os.cpu_count(), "isa": [f for f in FEATURES if f in flags]}
