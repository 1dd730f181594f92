"""Code fingerprints: a hash of a module's code and of every project module it imports, transitively.

Read from the source files with `ast`, never imported, so computing one costs milliseconds and no
TensorFlow import. Only code counts: comments, docstrings and formatting are normalized away, so
editing them keeps every cached output; any other edit of a module changes the fingerprint of each
stage whose code reaches it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import threading
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("tapeline", "stages", "sweeps", "flows")


@cache
def _package_root(package: str) -> Path:
    """The directory of a top-level project package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"project package {package} is not importable")
    return Path(next(iter(spec.submodule_search_locations)))


def module_file(name: str) -> Path | None:
    """The source file of project module `name`, or None when `name` is not a module (a function, say)."""
    top, *rest = name.split(".")
    base = _package_root(top).joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_source(name: str) -> str:
    """The source text of a project module."""
    path = module_file(name)
    if path is None:
        raise ModuleNotFoundError(f"project module {name} has no source file")
    return path.read_text(encoding="utf-8")


_PARSING = threading.Lock()


def parse_source(text: str, filename: str) -> ast.Module:
    """`ast.parse`, one call at a time in this process, retried once on CPython's spurious "AST constructor
    recursion depth mismatch" SystemError. CPython 3.11 keeps the AST constructor's recursion depth in
    interpreter-wide state (gh-95185) and checks it after each conversion: a conversion in another thread at the
    same moment (Prefect parses flow sources in its own threads while a run starts) or one that failed earlier
    without restoring it (gh-106905) makes a valid file fail this check. Our parses cannot race each other under
    the lock; a race with another library's parse is rare and passes on the retry."""
    with _PARSING:
        try:
            return ast.parse(text, filename=filename)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            return ast.parse(text, filename=filename)


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree with every module, class and function docstring removed (in place)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def imported_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module an ImportFrom names: `from .x import y` in package `a.b` is `a.b.x`, `from .. import y`
    is `a`."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def imported_names(tree: ast.Module, package: str) -> set[str]:
    """Every absolute dotted name a module imports anywhere in its body (function-level imports included): the
    module itself and, for `from M import n`, also `M.n` (which is a module when `n` is a submodule)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = imported_base(node, package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _with_parents(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a module runs its packages' `__init__` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _project_imports(tree: ast.Module, package: str) -> set[str]:
    """Project modules (and their packages) a module imports anywhere in its body."""
    found: set[str] = set()
    for name in imported_names(tree, package):
        if name.split(".")[0] in PROJECT_PACKAGES and module_file(name):
            found.update(n for n in _with_parents(name) if module_file(n))
    return found


def _package_of(name: str) -> str:
    """The package relative imports in module `name` resolve against: itself for a package's `__init__`."""
    path = module_file(name)
    return name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]


@cache
def normalized_module(name: str) -> tuple[str, frozenset[str]]:
    """(a dump of the module's code without docstrings, the project modules it imports)."""
    tree = parse_source(module_source(name), name)
    imports = _project_imports(tree, _package_of(name))
    return ast.dump(without_docstrings(tree)), frozenset(imports - {name})


def module_closure(name: str) -> list[str]:
    """`name` and every project module it reaches through imports, sorted."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current not in seen:
            seen.add(current)
            pending.extend(normalized_module(current)[1])
    return sorted(seen)


def code_fingerprint(name: str) -> str:
    """A hash of the code of `name` and of every project module it imports."""
    digest = hashlib.sha256()
    for module in module_closure(name):
        digest.update(module.encode() + b"\0" + normalized_module(module)[0].encode() + b"\0")
    return digest.hexdigest()[:16]
