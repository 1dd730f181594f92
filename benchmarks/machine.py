"""The machine a benchmark ran on: CPU model, core count and the ISA features that decide TensorFlow's kernels."""

from __future__ import annotations

from typing import Any

from stages.hardware import cpu


def machine() -> dict[str, Any]:
    """{cpu, family, model_number, cores, isa} of this machine (see `stages.hardware.cpu`)."""
    found = cpu()
    return {"cpu": found["model"], "family": found["family"], "model_number": found["model_number"],
            "cores": found["cores"], "isa": found["isa"]}
