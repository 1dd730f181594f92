"""What this machine is, and the choices `auto` settings make on it (read from /proc/cpuinfo: no TensorFlow).

The train manifest and the model card record the CPU model, core count and the instruction-set features that
decided `train.precision=auto` and oneDNN; `tapeline plan` says what they would be here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# The features TensorFlow's CPU kernels (oneDNN) dispatch on, in the order they matter for training speed.
FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
            "amx_int8")
BF16_TILES = "amx_bf16"
BF16_DOT = "avx512_bf16"
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
SET_BY_TAPELINE = "TAPELINE_SET_ONEDNN"  # tells child processes (workers) who set ONEDNN_VARIABLE
X86 = ("x86_64", "amd64", "i386", "i686")
TENSORFLOW_BUILDS = ("tensorflow-cpu", "tensorflow")


@cache
def cpu(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """{model, family, model_number, cores, isa}: the CPU's model name, its family and model numbers (None where
    not reported), logical cores and which of FEATURES it reports. Under a hypervisor the name can be as bare as
    "AMD EPYC" for Zen 2 to Zen 5 alike; the family and model numbers still tell them apart."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() not in fields:  # the first processor's block
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "unknown"), "family": _cpuinfo_number(fields.get("cpu family")),
            "model_number": _cpuinfo_number(fields.get("model")), "cores": os.cpu_count(),
            "isa": [f for f in FEATURES if f in flags]}


def _cpuinfo_number(value: str | None) -> int | None:
    """A decimal field of /proc/cpuinfo, or None."""
    return int(value) if value is not None and value.isdigit() else None


def cpu_name(found: dict[str, Any]) -> str:
    """The CPU's model name with its family and model numbers where known: "AMD EPYC (family 25, model 17)"."""
    if found.get("family") is None:
        return found["model"]
    return f"{found['model']} (family {found['family']}, model {found.get('model_number')})"


def cpu_precision() -> tuple[str, str]:
    """(precision, reason) that `train.precision=auto` picks on this CPU when there is no GPU."""
    return precision_for_cpu(cpu())


def precision_for_cpu(found: dict[str, Any]) -> tuple[str, str]:
    """(precision, reason) for a CPU described as `cpu()` describes one: bf16 where it has bf16 instructions
    (AMX tiles, or AVX-512 BF16 dot products: the default CNN trained 1.3x faster in mixed_bfloat16 than in
    float32 on a Zen 5 EPYC and 1.46x on a Zen 4, benchmarks/cpu_speed.py), float32 elsewhere."""
    if BF16_TILES in found["isa"]:
        return "mixed_bfloat16", f"CPU with AMX bf16 tiles ({BF16_TILES}): {cpu_name(found)}"
    if BF16_DOT in found["isa"]:
        return "mixed_bfloat16", f"CPU with AVX-512 bf16 dot products ({BF16_DOT}), no AMX: {cpu_name(found)}"
    best = next((f for f in ("avx512f", "avx2", "avx") if f in found["isa"]), "no AVX")
    return "float32", (f"CPU without AMX or AVX-512 BF16 (best vector ISA {best}): {cpu_name(found)}; bf16 would be "
                       "emulated, slower")


def gpu_precision(name: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """(precision, reason) that `train.precision=auto` picks on a GPU: bfloat16 where its tensor cores have it
    (compute capability 8.0+: Ampere, Hopper; bfloat16 has float32's range, so no loss scaling), float16 with loss
    scaling inside the tape step on the first tensor cores (7.x: Volta, Turing), float32 on older GPUs."""
    shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
    if capability is not None and tuple(capability) >= (8, 0):
        return "mixed_bfloat16", f"GPU {name}, compute capability {shown}: bfloat16 tensor cores"
    if capability is not None and tuple(capability) >= (7, 0):
        return "mixed_float16", (f"GPU {name}, compute capability {shown}: float16 tensor cores, with loss scaling "
                                 "in the tape step")
    return "float32", f"GPU {name}, compute capability {shown}: no tensor cores"


def installed_tensorflow_builds(find: Callable[[str], Any] = importlib.metadata.distribution) -> list[str]:
    """Which TensorFlow distributions are installed: `tensorflow-cpu` (the CPU build) and/or `tensorflow` (the
    build that also drives NVIDIA GPUs, what `tapeline[gpu]` installs)."""
    found = []
    for name in TENSORFLOW_BUILDS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            find(name)
            found.append(name)
    return found


def tensorflow_install_problem(builds: Sequence[str]) -> str | None:
    """What is wrong with the installed TensorFlow builds, in one line with the fix, or None."""
    if not builds:
        return ("TensorFlow is not installed: pip install 'tapeline[cpu]' (or 'tapeline[gpu]' on a machine with an "
                "NVIDIA GPU)")
    if len(builds) > 1:
        return (f"two TensorFlow builds are installed ({' and '.join(builds)}), and they overwrite each other's files:"
                " pip uninstall -y tensorflow tensorflow-cpu, then pip install 'tapeline[cpu]' or 'tapeline[gpu]'")
    return None


def ensure_one_tensorflow() -> None:
    """InstallError in one line when no TensorFlow build, or both, are installed (before any work)."""
    from tapeline.errors import InstallError

    if (problem := tensorflow_install_problem(installed_tensorflow_builds())) is not None:
        raise InstallError(problem)


def nvidia_gpus(run: Callable[..., Any] = subprocess.run) -> list[dict[str, Any]]:
    """The NVIDIA GPUs the driver reports, [{name, capability}], without TensorFlow (`nvidia-smi`; none when the
    driver or the tool is missing)."""
    try:
        done = run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                   text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    gpus = []
    for line in done.stdout.strip().splitlines():
        name, _, cap = (part.strip() for part in line.rpartition(","))
        major, _, minor = cap.partition(".")
        capability = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None
        gpus.append({"name": name or cap, "capability": capability})
    return gpus


def planned_device(builds: Sequence[str], gpus: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The device that would train, without importing TensorFlow: the first GPU when the installed build drives
    GPUs and the driver reports one, else the CPU, with the reason."""
    if "tensorflow" in builds and gpus:
        first = gpus[0]
        return {"value": "GPU", "name": first["name"], "capability": first["capability"], "gpus": len(gpus),
                "reason": f"{len(gpus)} NVIDIA GPU(s) and the GPU build of TensorFlow"}
    if gpus:
        reason = f"{len(gpus)} NVIDIA GPU(s), but the CPU build of TensorFlow: pip install 'tapeline[gpu]'"
    else:
        reason = "no NVIDIA GPU reported by the driver"
    return {"value": "CPU", "name": cpu_name(cpu()), "reason": reason}


def planned_choices(precision: str, builds: Sequence[str] | None = None,
                    gpus: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """What `auto` settings would pick on this machine, for `tapeline plan`: the device that would train and the
    precision on it (found without TensorFlow, which plan does not import)."""
    device = planned_device(installed_tensorflow_builds() if builds is None else builds,
                            nvidia_gpus() if gpus is None else gpus)
    onednn = _planned_onednn()
    if precision != "auto":
        value, reason = precision, "set explicitly"
    elif device["value"] == "GPU":
        value, reason = gpu_precision(device["name"], device["capability"])
    else:
        value, reason = cpu_precision()
    return {"device": device, "train.precision": {"value": value, "reason": reason}, "onednn": onednn, "cpu": cpu()}


def _planned_onednn(environ: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """Whether training here would run oneDNN kernels, without importing TensorFlow: on when the variable says 1
    (tapeline's choice unless the user set it), off when it says 0, else TensorFlow's choice for this CPU."""
    value = environ.get(ONEDNN_VARIABLE)
    if value is None:
        found = cpu()["isa"]
        enabled = any(f in found for f in ("avx512_vnni", "avx512_bf16", "amx_tile"))
    else:
        enabled = value.strip().lower() in ("1", "true")
    return {"value": "on" if enabled else "off", "reason": onednn_reason(enabled)}


def prefer_onednn(environ: MutableMapping[str, str] = os.environ, modules: Mapping[str, Any] = sys.modules) -> str:
    """Turn TensorFlow's oneDNN kernels on for this process and its children unless the user chose (who decided,
    for `onednn_decision`). TensorFlow enables them by itself only on x86 CPUs with AVX-512 VNNI, BF16 or AMX; on
    an AVX2-only AMD EPYC they trained the default CNN 1.4x faster than its Eigen kernels (benchmarks/
    cpu_speed.py). Must run before TensorFlow is imported, which reads the variable once."""
    if ONEDNN_VARIABLE in environ:
        return "tapeline" if environ.get(SET_BY_TAPELINE) == environ[ONEDNN_VARIABLE] else "user"
    if platform.machine().lower() not in X86:
        return "not x86"
    if "tensorflow" in modules:
        return "imported first"
    environ[ONEDNN_VARIABLE] = environ[SET_BY_TAPELINE] = "1"
    return "tapeline"


@cache
def onednn_origin() -> str:
    """Who chose oneDNN in this process (`prefer_onednn`, made once). The engine calls this before it runs a stage,
    loads user code or predicts, so tapeline's choice lands before TensorFlow is imported; importing tapeline
    changes no environment."""
    return prefer_onednn()


def onednn_reason(enabled: bool, origin: str | None = None, environ: MutableMapping[str, str] = os.environ) -> str:
    """Why oneDNN is on or off in this process, for the train manifest, the model card and `tapeline plan`."""
    state, origin = ("on" if enabled else "off"), origin or onednn_origin()
    if origin == "user":
        return f"{state}: {ONEDNN_VARIABLE}={environ.get(ONEDNN_VARIABLE)} set by the user"
    if origin == "tapeline":
        return f"{state}: tapeline set {ONEDNN_VARIABLE}=1 (TensorFlow turns oneDNN on by itself only with AVX-512 " \
               "VNNI/BF16 or AMX)"
    if origin == "imported first":
        return f"{state}: TensorFlow was imported before tapeline, with TensorFlow's own choice for this CPU; set " \
               f"{ONEDNN_VARIABLE}=1 before importing it"
    return f"{state}: TensorFlow's own choice on {platform.machine()}"


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs oneDNN kernels (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def onednn_decision() -> dict[str, Any]:
    """{enabled, reason}: oneDNN in this process, as the train manifest and the model card record it."""
    enabled = onednn_enabled()
    return {"enabled": enabled, "reason": onednn_reason(enabled)}


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of memory this machine can give a new process now (MemAvailable), None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
