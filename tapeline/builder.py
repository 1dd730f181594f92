"""The user's own model: `model.builder`, a reference to a Keras model builder, resolved, checked and
fingerprinted by its code.

A reference is `path/to/file.py:function` (relative to the working directory, or absolute) or
`package.module:function`, as in Prefect entrypoints. Its code fingerprint is read with `ast`, like
`tapeline.codehash`, never imported: the builder's module and every module it imports, transitively,
that is not part of Python or an installed third-party package (so a helper imported from another
directory counts; keras and numpy do not). Comments, docstrings and formatting are normalized away.

Importing and calling the builder happens once, before any work (`check_builder`): every way it can
be wrong is one ConfigError naming the key and the fix.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tapeline.codehash import parse_source, without_docstrings
from tapeline.config import ModelConfig
from tapeline.errors import ConfigError
from tapeline.hardware import onednn_origin

KEY = "model.builder"
PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")
LOGITS_FIX = "end with Dense(num_classes) and no activation; tapeline's loss takes logits"


@dataclass(frozen=True)
class Reference:
    """A parsed `model.builder`: the module's source file (or dotted name), and the function's name."""

    text: str
    function: str
    file: Path | None  # the file form
    module: str  # the module's name: the file's stem for the file form

    @property
    def search_root(self) -> Path | None:
        """The directory a file-form builder's own imports are found in first (its own directory)."""
        return self.file.parent if self.file is not None else None


@dataclass(frozen=True)
class CodeFile:
    """One module the builder's fingerprint covers."""

    module: str
    path: str  # relative to the sys.path entry it was found under
    sha256: str  # of the normalized code (no comments, docstrings or formatting)


def _parse_reference(text: str) -> Reference:
    """Split `model.builder` into its module and function (no import, no file access)."""
    target, _, function = text.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        file = Path(target).expanduser()
        return Reference(text, function, file if file.is_absolute() else Path.cwd() / file, file.stem)
    return Reference(text, function, None, target)


# ---------------------------------------------------------------- finding code without importing it

@cache
def _third_party_roots() -> tuple[Path, ...]:
    """Where Python's own library and installed packages live: modules there are not the user's code."""
    paths = sysconfig.get_paths()
    roots = {Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(sorted(roots))


def _is_user_file(path: Path) -> bool:
    """A Python source file that is neither Python's library nor inside an installed package."""
    resolved = path.resolve()
    if resolved.suffix != ".py" or any(part in ("site-packages", "dist-packages") for part in resolved.parts):
        return False
    return not any(resolved.is_relative_to(root) for root in _third_party_roots())


def _search_path(reference: Reference) -> list[str]:
    """The directories imports are found in: the builder's own directory, then sys.path ('' = the cwd)."""
    entries = [str(reference.search_root)] if reference.search_root is not None else []
    return [*entries, *(entry or os.getcwd() for entry in sys.path)]


def _find_module_file(name: str, paths: list[str]) -> tuple[Path, Path] | None:
    """(source file, the search-path entry it was found under) of module `name` on `paths`, found as the
    import system would, importing nothing; None when it is not a source file there."""
    top, *rest = name.split(".")
    for entry in paths:
        spec = importlib.machinery.PathFinder.find_spec(top, [entry])
        if spec is None:
            continue
        for depth in range(1, len(rest) + 1):
            locations = spec.submodule_search_locations
            spec = importlib.machinery.PathFinder.find_spec(".".join([top, *rest[:depth]]), list(locations or []))
            if spec is None:
                return None
        return (Path(spec.origin), Path(entry)) if spec.origin and spec.has_location else None
    return None


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in `tree` may load (each package on the way included)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found = [base, *(f"{base}.{alias.name}" for alias in node.names)] if base else []
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _normalized_code(path: Path) -> tuple[str, ast.Module]:
    """(the code of a source file without comments, docstrings or formatting, its syntax tree without docstrings)."""
    try:
        tree = without_docstrings(parse_source(path.read_text(encoding="utf-8"), str(path)))
    except (OSError, UnicodeDecodeError, SyntaxError) as exc:
        raise ConfigError(f"{KEY}: cannot read {path} ({type(exc).__name__}: {exc}); fix the file") from None
    return ast.dump(tree), tree


def _relative_path(path: Path, entry: Path) -> str:
    """`path` relative to the search-path entry it was found under: the same on every machine."""
    try:
        return path.resolve().relative_to(entry.resolve()).as_posix()
    except ValueError:
        return path.name


def _builder_source(reference: Reference) -> tuple[Path, Path]:
    """(the builder module's source file, its search-path entry), or a ConfigError saying what is missing
    and how to fix it."""
    if reference.file is not None:
        if not reference.file.is_file():
            raise ConfigError(f"{KEY}: {reference.file} does not exist (from {reference.text!r}; a relative path is "
                              f"taken from the working directory {Path.cwd()}); give an existing file")
        return reference.file, reference.file.parent
    found = _find_module_file(reference.module, _search_path(reference))
    if found is None:
        raise ConfigError(f"{KEY}: no module {reference.module!r} on the Python path (from {reference.text!r}); "
                          "install the package, add its directory to PYTHONPATH, or use path/to/file.py:function")
    return found


def builder_code(text: str) -> tuple[CodeFile, ...]:
    """The modules `model.builder`'s code fingerprint covers, each with its normalized code's hash, sorted."""
    reference = _parse_reference(text)
    paths = _search_path(reference)
    pending: list[tuple[str, tuple[Path, Path]]] = [(reference.module, _builder_source(reference))]
    covered: dict[str, CodeFile] = {}
    while pending:
        module, (path, entry) = pending.pop()
        if module in covered:
            continue
        dump, tree = _normalized_code(path)
        covered[module] = CodeFile(module, _relative_path(path, entry), hashlib.sha256(dump.encode()).hexdigest())
        for name in imported_names(tree, module, path.name == "__init__.py"):
            found = _find_module_file(name, paths)
            if found is not None and _is_user_file(found[0]) and name not in covered:
                pending.append((name, found))
    return tuple(sorted(covered.values(), key=lambda f: f.module))


def builder_identity(text: str | None) -> dict[str, Any] | None:
    """What the model stage's fingerprint takes from the builder: its code, module by module (None: the CNN)."""
    if text is None:
        return None
    _check_defines(_parse_reference(text))
    return {"files": [{"module": f.module, "path": f.path, "sha256": f.sha256} for f in builder_code(text)]}


def top_level_names(tree: ast.Module) -> set[str]:
    """The names a module's own code binds at its top level: functions, classes, assignments, imports."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _check_defines(reference: Reference) -> None:
    """ConfigError when the builder's module, read with `ast` and never imported (so `plan` imports neither the
    user's code nor TensorFlow), binds no such name. A module that binds names dynamically (`globals()`,
    `from x import *`) is given the benefit of the doubt: importing it decides."""
    path = _builder_source(reference)[0]
    tree = parse_source(path.read_text(encoding="utf-8"), str(path))
    star = any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in tree.body)
    if not star and "globals" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} \
            and reference.function not in top_level_names(tree):
        raise ConfigError(f"{KEY}: {path} has no {reference.function!r}; name a function it defines")


# ---------------------------------------------------------------- importing and checking it

def load_builder(text: str) -> Callable[..., Any]:
    """Import `model.builder` and return the function; ConfigError naming what does not resolve."""
    reference = _parse_reference(text)
    source = _builder_source(reference)[0]
    onednn_origin()  # the user's module may import TensorFlow
    try:
        if reference.file is not None:
            module = _import_file(source, reference)
        else:
            module = importlib.import_module(reference.module)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything at import
        raise ConfigError(f"{KEY}: importing {source} failed with {type(exc).__name__}: {one_line(exc)}; fix the "
                          "module (its imports must be installed or on PYTHONPATH on every worker)") from None
    function = getattr(module, reference.function, None)
    if function is None:
        raise ConfigError(f"{KEY}: {source} has no {reference.function!r}; name a function it defines")
    if not callable(function):
        raise ConfigError(f"{KEY}: {reference.function} in {source} is a {type(function).__name__}, not callable; "
                          "name a function that returns a keras.Model")
    return function


def _import_file(path: Path, reference: Reference) -> Any:
    """Import a builder file as its module name, with its directory on sys.path (as Prefect loads a flow file),
    so that it finds its own helpers; imported once per process."""
    name = reference.module
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path.resolve():
        return loaded
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{KEY}: {path} is not a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_params(function: Callable[..., Any], config: ModelConfig) -> None:
    """The builder's signature must take input_shape, num_classes and every key of model.params."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin or C callable: the call itself will tell
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    missing = [name for name in ("input_shape", "num_classes") if name not in signature.parameters and not takes_any]
    if missing:
        raise ConfigError(f"{KEY}: {config.builder} does not take {' and '.join(missing)}; tapeline calls it as "
                          f"{config.builder.rpartition(':')[2]}(input_shape=(H, W, C), num_classes=N, **model.params): "
                          f"add {', '.join(missing)} to its arguments")
    try:
        signature.bind(input_shape=(1, 1, 1), num_classes=2, **config.params)
    except TypeError as exc:
        accepted = [p for p in signature.parameters if p not in ("input_shape", "num_classes")]
        raise ConfigError(f"model.params: {config.builder} does not take these arguments ({exc}); it accepts "
                          f"{', '.join(accepted) or 'no model.params'}") from None


def call_builder(function: Callable[..., Any], config: ModelConfig, shape: tuple[int, int, int],
                 num_classes: int) -> Any:
    """The builder's model for this input spec, with the builder's own exception turned into a ConfigError."""
    try:
        return function(input_shape=tuple(shape), num_classes=num_classes, **config.params)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise ConfigError(f"{KEY}: {config.builder} raised {type(exc).__name__}: {one_line(exc)}; fix the builder "
                          "or model.params" + "".join(f"\n{frame}" for frame in _user_frames(exc))) from None


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _user_frames(exc: BaseException) -> list[str]:
    """The frames of `exc`'s traceback in the user's own files, formatted as Python prints them: the one part of
    a traceback a user wants (never Python's, an installed package's, tapeline's or Prefect's)."""
    import traceback

    ours = [PROJECT_ROOT / package for package in ("tapeline", "stages", "flows")]
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if _is_user_file(Path(frame.filename)) and not any(Path(frame.filename).resolve().is_relative_to(root)
                                                               for root in ours)]
    return [f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}'
            + (f"\n    {frame.line}" if frame.line else "") for frame in frames]


def _output_activation(model: Any) -> str | None:
    """The activation of the layer that makes the model's output ('softmax', 'sigmoid', … or None)."""
    import keras

    try:
        layer = model.outputs[0]._keras_history[0]
    except (AttributeError, IndexError, TypeError, ValueError):
        layer = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", activation if isinstance(activation, str) else None)


def check_model(model: Any, config: ModelConfig, shape: tuple[int, int, int], num_classes: int | None) -> None:
    """The builder's return value must be a keras.Model taking `shape` images and returning (batch, N) logits
    (N = `num_classes`; None when the class count is not known yet: every check but the output's width)."""
    import keras

    ref = config.builder
    if not isinstance(model, keras.Model):
        raise ConfigError(f"{KEY}: {ref} returned a {type(model).__name__}, not a keras.Model; return "
                          "keras.Model(inputs, outputs) or a keras.Sequential")
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != tuple(shape):
        got = ", ".join(str(tuple(i.shape)) for i in inputs) or "no inputs"
        wanted = ", ".join(map(str, shape))
        raise ConfigError(f"{KEY}: {ref} returned a model whose input is {got}, not (None, {wanted}); build it on "
                          "keras.Input(shape=input_shape)")
    check_logits(model, config, shape, num_classes)


def check_logits(model: Any, config: ModelConfig, shape: tuple[int, int, int], num_classes: int | None) -> None:
    """On a batch of two images: the model runs, returns float (batch, N) values, and they are logits, not
    probabilities (no final softmax or sigmoid, rows not summing to 1)."""
    import keras
    import numpy as np

    ref = config.builder
    batch = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    try:
        raw = keras.ops.convert_to_numpy(model(batch, training=False))
    except Exception as exc:  # noqa: BLE001 - the user's layers may raise anything
        raise ConfigError(f"{KEY}: {ref}'s model fails on a batch of images {tuple(shape)}: {type(exc).__name__}: "
                          f"{one_line(exc)}; fix the model") from None
    if not np.issubdtype(np.asarray(raw).dtype, np.floating):
        raise ConfigError(f"{KEY}: {ref}'s model returns {np.asarray(raw).dtype} values, not floating-point logits; "
                          f"{LOGITS_FIX}")
    output = np.asarray(raw, np.float64)
    if output.ndim != 2 or output.shape[0] != 2 or (num_classes is not None and output.shape[1] != num_classes):
        got = ", ".join(map(str, output.shape[1:]))
        wanted = num_classes if num_classes is not None else "num_classes"
        raise ConfigError(f"{KEY}: {ref} returned a model whose output is (batch, {got}), not (batch, {wanted}); "
                          f"end with Dense(num_classes) for the {wanted} classes")
    activation = _output_activation(model)
    sums_to_one = bool(np.all(output >= 0) and np.allclose(output.sum(axis=1), 1.0, atol=1e-3))
    if activation in PROBABILITY_ACTIVATIONS or sums_to_one:
        what = f"a final {activation} activation" if activation in PROBABILITY_ACTIVATIONS else "rows summing to 1"
        raise ConfigError(f"{KEY}: {ref} returns probabilities ({what}), not logits; {LOGITS_FIX}")


def build_user_model(config: ModelConfig, shape: tuple[int, int, int], num_classes: int) -> Any:
    """The user's model for this input spec, checked (see `check_model`)."""
    assert config.builder is not None
    function = load_builder(config.builder)
    _check_params(function, config)
    model = call_builder(function, config, shape, num_classes)
    check_model(model, config, shape, num_classes)
    return model


def check_builder(config: ModelConfig) -> None:
    """The checks that need no input spec, run once before any work: the reference resolves to a callable
    and its signature takes model.params."""
    if config.builder is not None:
        _check_params(load_builder(config.builder), config)


def import_user_code(config: ModelConfig) -> None:
    """Import the builder's module (a saved model's custom layers register themselves there) before loading
    a model it built."""
    if config.builder is not None:
        load_builder(config.builder)
