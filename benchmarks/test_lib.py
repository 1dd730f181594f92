"""Tests of the benchmarks' own library (run by `make test` beside `tests/`, which never imports benchmarks)."""

from __future__ import annotations

from benchmarks.lib import STAGES, THROUGHPUT, as_on_avx2


def test_the_avx2_stand_in_runs_contenders_as_an_avx2_cpu_would() -> None:

    assert as_on_avx2(STAGES) == {
        # TensorFlow imported first keeps its own choice, which on an AVX2-only x86 CPU is Eigen (oneDNN off)
        "tutorial_loop": (True, {"TF_ENABLE_ONEDNN_OPTS": "0"}, None),
        "tapeline_v2_defaults": (True, {"TF_ENABLE_ONEDNN_OPTS": "0"}, ["preset=v2", "train.precision=float32"]),
        # tapeline's own choice stays (oneDNN on); `auto` would pick float32 there, so the float32 twin goes
        "tapeline_defaults": (False, {}, ["train.precision=float32"]),
    }
    emulated = as_on_avx2(THROUGHPUT)
    assert emulated["tapeline_tutorial_preset_onednn_off"][1] == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert emulated["tapeline_tutorial_preset"] == (False, {}, ["preset=tutorial", "train.precision=float32"])
