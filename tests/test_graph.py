"""The stage graph: one declaration, computed code fingerprints, runtime keys, and `tapeline plan`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tapeline.codehash
from flows.cli import build_parser, main
from stages.graph import GRAPH, STAGE_NAMES, fingerprints
from stages.pipeline import run_all
from tapeline.codehash import code_fingerprint, module_closure, module_source
from tapeline.config import load_config
from tapeline.testing import tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def edited_sources(monkeypatch: pytest.MonkeyPatch):
    """`edit(module, text)`: code fingerprints see `text` as that module's source until the test ends."""
    texts: dict[str, str] = {}
    monkeypatch.setattr(tapeline.codehash, "module_source", lambda name: texts.get(name) or module_source(name))

    def edit(module: str, text: str) -> None:
        texts[module] = text
        tapeline.codehash.normalized_module.cache_clear()

    yield edit
    tapeline.codehash.normalized_module.cache_clear()


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
    assert [s.module for s in GRAPH] == ["stages.data.stage", "stages.validate", "stages.model", "stages.train.stage",
                                         "stages.evaluate", "stages.export"]
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
    assert module_closure("stages.train.stage") == sorted([
        "stages", "stages.data", "stages.train", "tapeline",  # packages: their __init__ runs on import
        "stages.data.layout", "stages.data.readers", "stages.model", "stages.train.checkpoints",
        "stages.train.early_stopping", "stages.train.environment", "stages.train.loop", "stages.train.outputs",
        "stages.train.stage", "stages.train.step", "stages.train.warm_start",
        "tapeline.builder", "tapeline.cache", "tapeline.cluster", "tapeline.codehash", "tapeline.config",
        "tapeline.errors", "tapeline.hardware", "tapeline.processes", "tapeline.registry", "tapeline.results",
        "tapeline.store",
    ])
    assert "stages.registry" not in module_closure("stages.evaluate")  # evaluate knows nothing of production
    assert "stages.evaluate" not in module_closure("stages.export")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> tuple[Path, list[str]]:
    """(artifacts, overrides): every stage of the tiny config built once (read-only by convention)."""
    artifacts = tmp_path_factory.mktemp("built") / "a"
    overrides = tiny_overrides(f"idx:{idx_dir}", "train.max_epochs=1")
    run_all(load_config(None, overrides), artifacts)
    return artifacts, overrides


def test_editing_a_stage_changes_it_and_its_downstream_only(built: tuple[Path, list[str]], edited_sources,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    artifacts, overrides = built
    base = plan_fingerprints(artifacts, capsys, *overrides)
    assert len(set(base.values())) == len(STAGE_NAMES)

    edited_sources("stages.evaluate", module_source("stages.evaluate") + "\nEXTRA_CONSTANT = 1\n")
    after = plan_fingerprints(artifacts, capsys, *overrides)
    assert [n for n in STAGE_NAMES if after[n] != base[n]] == ["evaluate", "export"] and None not in after.values()

    edited_sources("stages.model", module_source("stages.model") + "\nEXTRA_CONSTANT = 2\n")
    after = plan_fingerprints(artifacts, capsys, *overrides)
    assert [n for n in STAGE_NAMES if after[n] != base[n]] == ["model", "train", "evaluate", "export"]
    assert None not in after.values()  # model's dependents key on its fingerprint, known before it is built


def test_comment_only_edit_keeps_every_fingerprint(built: tuple[Path, list[str]], edited_sources,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    artifacts, overrides = built
    base = plan_fingerprints(artifacts, capsys, *overrides)
    edited_sources("stages.data.stage", module_source("stages.data.stage").replace("\n\n", "\n\n# why, not what\n", 1))
    assert plan_fingerprints(artifacts, capsys, *overrides) == base


def test_a_decoder_edit_reruns_data_only_and_byte_identical_records_keep_the_rest(
        tmp_path: Path, built: tuple[Path, list[str]], edited_sources, capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = tmp_path / "a"
    shutil.copytree(built[0], artifacts)
    overrides = built[1]
    base = plan_json(artifacts, *overrides, capsys=capsys)["stages"]
    assert "tapeline.imaging" in base["data"]["code"]
    edited_sources("tapeline.imaging", module_source("tapeline.imaging") + "\nDECODER_REVISION = 2\n")

    planned = plan_json(artifacts, *overrides, capsys=capsys)
    assert planned["stages"]["data"]["fingerprint"] not in (None, base["data"]["fingerprint"])
    assert {n: planned["stages"][n].get("waits_on") for n in STAGE_NAMES[1:]} == dict.fromkeys(STAGE_NAMES[1:], "data")
    assert planned["would_run"] == list(STAGE_NAMES)

    results = run_all(load_config(None, overrides), artifacts)
    assert [n for n in STAGE_NAMES if not results[n].cached] == ["data"]
    assert {n: results[n].fingerprint for n in STAGE_NAMES[1:]} == {n: base[n]["fingerprint"] for n in STAGE_NAMES[1:]}
    assert plan_json(artifacts, *overrides, capsys=capsys)["would_run"] == []


def test_plan_lists_each_stages_code_and_no_stage_past_data_has_the_decoder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stages = plan_json(tmp_path / "a", capsys=capsys)["stages"]
    assert {name: row["code"] for name, row in stages.items()} == {s.name: module_closure(s.module) for s in GRAPH}
    decoding = {"tapeline.imaging", "stages.data.sources.images", "stages.data.sources.resolve"}
    assert decoding <= set(stages["data"]["code"])
    for name in STAGE_NAMES[1:]:
        assert not decoding & set(stages[name]["code"]), name
        assert not [m for m in stages[name]["code"] if m.startswith("stages.data.sources")], name


def test_runtime_keys_leave_fingerprints_and_used_by_keys_move(idx_dir: Path, built: tuple[Path, list[str]]) -> None:
    source = f"idx:{idx_dir}"

    def fingerprints_of(config):
        return fingerprints(config, built[0])

    base = fingerprints_of(tiny_config(source, "train.max_epochs=1"))
    assert None not in base.values()
    runtime = fingerprints_of(tiny_config(source, "train.max_epochs=1", "data.retries=5",
                                       "data.timeout_seconds=9", "train.retries=3", "train.timeout_seconds=60",
                                       "train.steps_per_execution=7", "evaluate.timeout_seconds=5",
                                       "export.lock_timeout_seconds=5", "export.timeout_seconds=5",
                                       "export.min_accuracy=0.5", "export.promote_min_delta=0.01"))
    assert runtime == base
    batch = fingerprints_of(tiny_config(source, "train.max_epochs=1", "data.batch_size=8"))
    assert [n for n in STAGE_NAMES if batch[n] != base[n]] == ["train", "evaluate", "export"]
    strict = fingerprints_of(tiny_config(source, "train.max_epochs=1", "validate.drift=error"))
    assert [n for n in STAGE_NAMES if strict[n] != base[n]] == ["validate"]  # a gate, not an input of model
    pictures = fingerprints_of(tiny_config(source, "train.max_epochs=1", "evaluate.worst_examples=3"))
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
    assert full["stages"] == {stage.name: {"fingerprint": results[stage.name].fingerprint, "cached": True,
                                           "path": str(results[stage.name].path), "code": module_closure(stage.module)}
                              for stage in GRAPH}

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
    assert text[-5:-3] == ["would run: evaluate", "the promotion step runs on every run"]
    assert text[-3].startswith("device: ") and text[-2].startswith("train.precision: ")
    assert text[-1].startswith("oneDNN kernels: ")


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
