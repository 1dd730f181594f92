"""The layout's rules, read from the source with `ast` as code hashing reads it: no import cycles (function-level
imports counted), each room imports only the rooms below it, no `sys.path` edits, every project package hashed."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from stages.graph import GRAPH
from tapeline.codehash import PROJECT_PACKAGES, imported_base, imported_names, module_closure, module_file

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("tapeline", "stages", "sweeps", "flows", "benchmarks", "tests")
# Who may import whom: the engine nothing of ours, the stages the engine, the search both, Prefect's room all three;
# tests and benchmarks reach the product, never each other.
MAY_IMPORT = {
    "tapeline": {"tapeline"},
    "stages": {"tapeline", "stages"},
    "sweeps": {"tapeline", "stages", "sweeps"},
    "flows": {"tapeline", "stages", "sweeps", "flows"},
    "benchmarks": {"tapeline", "stages", "sweeps", "flows", "benchmarks"},
    "tests": {"tapeline", "stages", "sweeps", "flows", "tests"},
}


def module_name(path: Path) -> str:
    """`stages/data/readers.py` -> `stages.data.readers`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    """Every module of the five rooms, by dotted name."""
    return {module_name(p): p for room in ROOMS for p in sorted((ROOT / room).rglob("*.py"))}


def local_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository's modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return {n for n in imported_names(ast.parse(path.read_text(), str(path)), package) if n in modules} - {name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository's modules it imports."""
    modules = all_modules()
    return {name: local_imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_there_is_no_import_cycle_function_level_imports_included() -> None:
    graph = import_graph()
    assert len(graph) > 80
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_room_imports_only_the_rooms_below_it() -> None:
    wrong = [f"{name} imports {target}" for name, targets in import_graph().items() for target in targets
             if target.split(".")[0] not in MAY_IMPORT[name.split(".")[0]]]
    assert wrong == []


def test_no_prefect_in_stages_and_no_tensorflow_in_the_engine_at_import() -> None:
    modules = all_modules()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        names = {n.split(".")[0] for n in imported_names(tree, name.rpartition(".")[0])}
        if name.startswith(("stages", "tapeline", "sweeps")):
            assert "prefect" not in names, name
        top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                     for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        if name.startswith(("stages", "tapeline", "sweeps", "flows")):
            assert not top_level & {"tensorflow", "keras"}, f"{name} imports TensorFlow at import time"


def test_sys_path_is_edited_only_by_the_user_builder_loader() -> None:
    edits = [f"{name}" for name, path in all_modules().items()
             if re.search(r"sys\.path\.(insert|append|extend|remove)|sys\.path\s*=", path.read_text())]
    assert edits == ["tapeline.builder"]


def test_no_benchmark_script_imports_another_script() -> None:
    shared = {"benchmarks", "benchmarks.lib"}
    scripts = {n: t for n, t in import_graph().items() if n.startswith("benchmarks.") and n not in shared}
    assert {n: sorted(t & set(scripts)) for n, t in scripts.items() if t & set(scripts)} == {}


def test_importing_a_package_changes_no_environment() -> None:
    for path in [ROOT / room / "__init__.py" for room in ("tapeline", "stages", "stages/data", "stages/train",
                                                         "sweeps")]:
        tree = ast.parse(path.read_text())
        assert [type(n).__name__ for n in tree.body] == ["Expr"], f"{path} does more than document its package"


def test_every_project_package_is_hashed() -> None:
    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in installed["include"]} == set(PROJECT_PACKAGES)
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert on_disk == set(PROJECT_PACKAGES)
    for name in all_modules():
        if name.split(".")[0] in PROJECT_PACKAGES:
            assert module_file(name) == all_modules()[name], name


def test_every_module_a_stage_imports_is_in_its_code_fingerprint() -> None:
    modules = all_modules()
    for stage in GRAPH:
        closure = set(module_closure(stage.module))
        for name in closure:
            assert local_imports(name, modules[name], modules) <= closure, name


def test_relative_imports_resolve_against_the_right_package() -> None:
    tree = ast.parse("from . import readers\nfrom .sources import resolve\nfrom .. import graph\n"
                     "import tapeline.cache\n")
    assert imported_names(tree, "stages.data") == {
        "stages.data", "stages.data.readers", "stages.data.sources", "stages.data.sources.resolve", "stages",
        "stages.graph", "tapeline.cache"}
    node = ast.parse("from ...x import y").body[0]
    assert isinstance(node, ast.ImportFrom) and imported_base(node, "a.b.c") == "a.x"


def test_a_relative_import_is_followed_into_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    import tapeline.codehash as codehash

    original = codehash.module_source
    texts = {"stages.data.layout": original("stages.data.layout") + "\nfrom . import readers\n"}
    monkeypatch.setattr(codehash, "module_source", lambda name: texts.get(name) or original(name))
    codehash.normalized_module.cache_clear()
    try:
        assert "stages.data.readers" in codehash.module_closure("stages.data.layout")
    finally:
        codehash.normalized_module.cache_clear()


def test_parsing_retries_cpythons_spurious_recursion_depth_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import tapeline.codehash as codehash

    real, calls = ast.parse, []

    def flaky(text: str, filename: str = "<unknown>") -> ast.Module:
        calls.append(filename)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=102, after=37)")
        return real(text, filename=filename)

    monkeypatch.setattr(codehash.ast, "parse", flaky)
    assert isinstance(codehash.parse_source("x = 1\n", "m.py"), ast.Module) and calls == ["m.py", "m.py"]
    monkeypatch.setattr(codehash.ast, "parse", lambda *_a, **_k: (_ for _ in ()).throw(SystemError("other")))
    with pytest.raises(SystemError, match="other"):
        codehash.parse_source("x = 1\n", "m.py")


def product_modules() -> dict[str, Path]:
    """The product's modules (not tests or benchmarks), packages' `__init__` left out."""
    return {name: path for name, path in all_modules().items()
            if name.split(".")[0] in ROOMS[:4] and path.name != "__init__.py"}


def top_level_names() -> set[str]:
    """Every function and class defined at the top level of a product module."""
    return {node.name for path in product_modules().values() for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef | ast.ClassDef)}


def test_the_architecture_page_names_every_module_of_the_four_rooms() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+)(?:\.py)?`", page))
    missing = [name for name, path in product_modules().items() if path.stem not in named]
    assert missing == [], f"docs/architecture.md does not name {missing}"


def test_the_architecture_page_names_no_function_or_file_that_does_not_exist() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    files = {p.name for room in ROOMS for p in (ROOT / room).rglob("*.py")}
    stale_files = sorted(set(re.findall(r"`([a-z_]+\.py)`", page)) - files)
    functions = {token for token in re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?:\(\))?`", page)}
    stale_functions = sorted(functions - top_level_names() - {p.stem for p in product_modules().values()})
    assert (stale_files, stale_functions) == ([], [])
