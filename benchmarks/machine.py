"""The machine a benchmark ran on: CPU model, core count and the ISA features that decide TensorFlow's kernels."""

from __future__ import annotations

from typing import Any

from stages.hardware import cpu


def machine() -> dict[str, Any]:
    """{cpu, cores, isa} of this machine (see `stages.hardware.cpu`)."""
    found = cpu()
    return {"cpu": found["model"], "cores": found["cores"], "isa": found["isa"]}
