"""What this machine is, and the choices `auto` settings make on it (read from /proc/cpuinfo: no TensorFlow).

The train manifest and the model card record the CPU model, core count and the instruction-set features that
decided `train.precision=auto`; `tapeline plan` says what `auto` would pick here.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# The features TensorFlow's CPU kernels (oneDNN) dispatch on, in the order they matter for training speed.
FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
            "amx_int8")
BF16_TILES = "amx_bf16"


@cache
def cpu(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """{model, cores, isa}: the CPU's model name, logical cores and which of FEATURES it reports."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in FEATURES if f in flags]}


def cpu_precision() -> tuple[str, str]:
    """(precision, reason) that `train.precision=auto` picks on this CPU when there is no GPU."""
    found = cpu()
    if BF16_TILES in found["isa"]:
        return "mixed_bfloat16", f"CPU with AMX bf16 tiles ({BF16_TILES}): {found['model']}"
    best = next((f for f in ("avx512f", "avx2", "avx") if f in found["isa"]), "no AVX")
    return "float32", f"CPU without AMX (best vector ISA {best}): {found['model']}; bf16 would be emulated, slower"


def planned_choices(precision: str) -> dict[str, Any]:
    """What `auto` settings would pick on this machine, for `tapeline plan` (a GPU TensorFlow sees decides
    otherwise: mixed_float16 on tensor cores; finding one needs TensorFlow, which plan does not import)."""
    if precision != "auto":
        return {"train.precision": {"value": precision, "reason": "set explicitly"}, "cpu": cpu()}
    value, reason = cpu_precision()
    return {"train.precision": {"value": value, "reason": reason, "unless": "a GPU with tensor cores: mixed_float16"},
            "cpu": cpu()}
