"""The stage graph: one declaration, computed code fingerprints, runtime keys, and `tapeline plan`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stages.codehash
from flows.cli import build_parser, main
from stages.codehash import code_fingerprint, module_closure, module_source
from stages.config import load_config
from stages.graph import GRAPH, STAGE_NAMES, fingerprints
from stages.pipeline import run_all
from tests.helpers import tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def edited_sources(monkeypatch: pytest.MonkeyPatch):
    """`edit(module, text)`: code fingerprints see `text` as that module's source until the test ends."""
    texts: dict[str, str] = {}
    monkeypatch.setattr(stages.codehash, "module_source", lambda name: texts.get(name) or module_source(name))

    def edit(module: str, text: str) -> None:
        texts[module] = text
        stages.codehash.normalized_module.cache_clear()

    yield edit
    stages.codehash.normalized_module.cache_clear()


def plan_json(artifacts: Path, *overrides: str, capsys: pytest.CaptureFixture[str]) -> dict:
    args = ["plan", "--json", "--artifacts", str(artifacts), *(a for o in overrides for a in ("--set", o))]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def plan_fingerprints(artifacts: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> dict[str, str]:
    return {name: row["fingerprint"] for name, row in plan_json(artifacts, *overrides, capsys=capsys)["stages"].items()}


def test_the_graph_is_declared_once_in_order() -> None:
    assert STAGE_NAMES == ("data", "validate", "model", "train", "evaluate", "export")
    seen: set[str] = set()
    for stage in GRAPH:
        assert set(stage.upstream) <= seen, f"{stage.name} depends on a later stage"
        seen.add(stage.name)
    assert [s.module for s in GRAPH] == [f"stages.{n}" for n in STAGE_NAMES]
    stage_command = build_parser()._subparsers._group_actions[0].choices["stage"]  # noqa: SLF001
    assert stage_command._positionals._group_actions[0].choices == (*STAGE_NAMES, "promotion")  # noqa: SLF001


def test_code_fingerprint_ignores_comments_and_docstrings_not_code(edited_sources) -> None:
    original = module_source("stages.evaluate")
    before = code_fingerprint("stages.evaluate")
    edited_sources("stages.evaluate", original.replace('"""The evaluate stage', '"""Reworded: the evaluate stage', 1)
                   + "\n# a new comment\n")
    assert code_fingerprint("stages.evaluate") == before
    edited_sources("stages.evaluate", original + "\nEXTRA_CONSTANT = 1\n")
    assert code_fingerprint("stages.evaluate") != before


def test_code_fingerprint_follows_project_imports() -> None:
    assert module_closure("stages.train") == sorted([
        "stages.builder", "stages.cache", "stages.cluster", "stages.codehash", "stages.config", "stages.data",
        "stages.early_stopping", "stages.errors", "stages.hardware", "stages.images", "stages.model",
        "stages.registry", "stages.results",
        "stages.sources", "stages.store", "stages.train", "stages.warmstart",
    ])
    assert "stages.registry" not in module_closure("stages.evaluate")  # evaluate knows nothing of production
    assert "stages.evaluate" not in module_closure("stages.export")


def test_editing_a_stage_changes_it_and_its_downstream_only(tmp_path: Path, edited_sources,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = tmp_path / "a"
    base = plan_fingerprints(artifacts, capsys)
    assert len(set(base.values())) == len(STAGE_NAMES)

    edited_sources("stages.evaluate", module_source("stages.evaluate") + "\nEXTRA_CONSTANT = 1\n")
    after = plan_fingerprints(artifacts, capsys)
    assert [n for n in STAGE_NAMES if after[n] != base[n]] == ["evaluate", "export"]

    edited_sources("stages.model", module_source("stages.model") + "\nEXTRA_CONSTANT = 2\n")
    after = plan_fingerprints(artifacts, capsys)
    assert [n for n in STAGE_NAMES if after[n] != base[n]] == ["model", "train", "evaluate", "export"]


def test_comment_only_edit_keeps_every_fingerprint(tmp_path: Path, edited_sources,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = plan_fingerprints(tmp_path / "a", capsys)
    edited_sources("stages.data", module_source("stages.data").replace("\n\n", "\n\n# why, not what\n", 1))
    assert plan_fingerprints(tmp_path / "a", capsys) == base


def test_runtime_keys_leave_fingerprints_and_used_by_keys_move(idx_dir: Path, tmp_path: Path) -> None:
    source = f"idx:{idx_dir}"

    def fingerprints_of(config):
        return fingerprints(config, tmp_path / "a")

    base = fingerprints_of(tiny_config(source))
    runtime = fingerprints_of(tiny_config(source, "data.retries=5",
                                       "data.timeout_seconds=9", "train.retries=3", "train.timeout_seconds=60",
                                       "train.steps_per_execution=7", "evaluate.timeout_seconds=5",
                                       "export.lock_timeout_seconds=5", "export.timeout_seconds=5",
                                       "export.min_accuracy=0.5", "export.promote_min_delta=0.01"))
    assert runtime == base
    batch = fingerprints_of(tiny_config(source, "data.batch_size=8"))
    assert [n for n in STAGE_NAMES if batch[n] != base[n]] == ["train", "evaluate", "export"]
    strict = fingerprints_of(tiny_config(source, "validate.drift=error"))
    assert [n for n in STAGE_NAMES if strict[n] != base[n]] == ["validate"]  # a gate, not an input of model
    pictures = fingerprints_of(tiny_config(source, "evaluate.worst_examples=3"))
    assert [n for n in STAGE_NAMES if pictures[n] != base[n]] == ["evaluate", "export"]


def test_plan_reports_cached_outputs_and_what_would_run(tmp_path: Path, idx_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = tmp_path / "a"
    overrides = tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=1")
    empty = plan_json(artifacts, *overrides, capsys=capsys)
    assert empty["would_run"] == list(STAGE_NAMES) and not artifacts.exists()  # plan writes nothing

    results = run_all(load_config(None, overrides), artifacts)
    full = plan_json(artifacts, *overrides, capsys=capsys)
    assert full["would_run"] == []
    assert full["stages"] == {name: {"fingerprint": results[name].fingerprint, "cached": True,
                                     "path": str(results[name].path)} for name in STAGE_NAMES}

    shutil.rmtree(results["evaluate"].path)
    assert plan_json(artifacts, *overrides, capsys=capsys)["would_run"] == ["evaluate"]
    shard = results["data"].path / "train-00000-of-00002.tfrecord"
    shard.write_bytes(bytes(b ^ 0xFF for b in shard.read_bytes()))
    assert plan_json(artifacts, *overrides, capsys=capsys)["would_run"] == ["evaluate"]  # sizes still match
    verified = main(["plan", "--json", "--verify", "--artifacts", str(artifacts),
                     *(a for o in overrides for a in ("--set", o))])
    assert verified == 0 and json.loads(capsys.readouterr().out)["would_run"] == ["data", "evaluate"]

    assert main(["plan", "--artifacts", str(artifacts), *(a for o in overrides for a in ("--set", o))]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"data      {results['data'].fingerprint}  cached  {results['data'].path}"
    assert text[4] == f"evaluate  {results['evaluate'].fingerprint}  to run  {results['evaluate'].path}"
    assert text[-4:-2] == ["would run: evaluate", "the promotion step runs on every run"]
    assert text[-2].startswith("train.precision: ") and text[-1].startswith("oneDNN kernels: ")


@pytest.mark.slow
def test_plan_imports_no_tensorflow(tmp_path: Path, idx_dir: Path) -> None:
    script = (
        "import sys, json; from flows.cli import main; "
        f"code = main(['plan', '--json', '--artifacts', {str(tmp_path)!r}, '--set', 'data.source=idx:{idx_dir}']); "
        "print(json.dumps({'code': code, 'heavy': sorted(m for m in ('tensorflow', 'keras', 'prefect') "
        "if m in sys.modules)}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}
