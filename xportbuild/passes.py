"""Graph passes a recipe can name: a literal registry of built-ins, or `module:attr` from the user's repo.

A pass takes an ExportedProgram and returns one. Its source file is part of the lower key.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from xportbuild.errors import RecipeError
from xportbuild.keys import PACKAGE, digest_value, hash_file, module_closure, package_module_file

REGISTRY: dict[str, str] = {
    "strip_embedding_padding_idx": "xportbuild.passes:strip_embedding_padding_idx",
}


def repo_root(recipe_file: str) -> Path:
    """The folder holding recipes/, from which `module:attr` passes are imported."""
    return Path(recipe_file).resolve().parent.parent.parent


# A dotted module name and an attribute: never a path, so that a pass is always code of the app's own repo.
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _reference(name: str) -> str:
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise KeyError(f"unknown pass {name!r}: use one of {', '.join(sorted(REGISTRY))} or 'module:attr'")
    if not _REFERENCE.match(name):
        raise KeyError("not 'module:attr' with a dotted module name (a path is not accepted: a pass is "
                       "a module of the repo holding recipes/)")
    return name


@dataclass(frozen=True)
class LocatedPass:
    """A pass found once, at plan time, without importing it: the lower key holds its name, reference and source
    digest; the file it was found in (machine-specific) only tells lower where to load it from."""

    name: str
    ref: str
    file: str
    source: str  # digest of the pass's module and of every module of the repo it imports

    def keyed(self) -> dict:
        return {"name": self.name, "ref": self.ref, "source": self.source}


def _module_file(module: str, root: Path) -> Path | None:
    if module == PACKAGE or module.startswith(PACKAGE + "."):
        return package_module_file(module)
    return _app_module_file(module, root)


def _app_module_file(module: str, root: Path) -> Path | None:
    """The file of `module` in the app's repo, if it is there (and stays there once links are resolved)."""
    if not all(part.isidentifier() for part in module.split(".")):
        return None
    base = root.joinpath(*module.split("."))
    file = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
    return file if file is not None and file.resolve().is_relative_to(root.resolve()) else None


def _source_digest(module: str, file: Path, root: Path) -> str:
    """The pass's module and the app's modules it imports (helpers edited must rerun lower as the pass itself)."""
    if module == PACKAGE or module.startswith(PACKAGE + "."):
        return hash_file(file)
    closure = module_closure((module,), functools.partial(_app_module_file, root=root))
    return digest_value({name: hash_file(path) for name, path in sorted(closure.items())})


def locate(names: tuple[str, ...], recipe_file: str) -> list[LocatedPass]:
    """Every named pass located in the recipe's repo (or among the built-ins); raises RecipeError with all
    problems. Nothing is imported and sys.path is left alone."""
    root, located, problems = repo_root(recipe_file), [], []
    for name in names:
        try:
            ref = _reference(name)
        except KeyError as err:
            problems.append(f"{recipe_file}: lower.passes: {name!r}: {err.args[0]}")
            continue
        module = ref.partition(":")[0]
        file = _module_file(module, root)
        if file is None:
            problems.append(f"{recipe_file}: lower.passes: {name!r}: no module {module!r} under {root} (a pass is "
                            "'module:attr', importable from the folder holding recipes/)")
            continue
        located.append(LocatedPass(name, ref, str(file), _source_digest(module, file, root)))
    if problems:
        raise RecipeError(problems)
    return located


def import_problems(located: list[LocatedPass], recipe_file: str) -> list[str]:
    """Each located pass imported and checked to be callable (validate's job: lower would fail on it much later)."""
    problems = []
    for found in located:
        try:
            load(found.ref, found.file)
        except RecipeError as err:
            problems.append(f"{recipe_file}: lower.passes: {found.name!r}: {err.problems[0]}")
    return problems


def apply(function, program, ref: str):
    """`function(program)`, which must return the program it rewrote; a pass that fails is named, not a traceback."""
    from xportbuild.errors import StageError

    try:
        result = function(program)
    except Exception as err:  # noqa: BLE001  a user's pass may raise anything; the message names it
        raise StageError(f"lower: pass {ref!r} raised {type(err).__name__}: {err}") from err
    if result is None or not hasattr(result, "graph_module"):
        raise StageError(f"lower: pass {ref!r} returned {type(result).__name__}, not the ExportedProgram it was given; "
                         "a pass must return the program")
    return result


def load(ref: str, file: str):
    """The pass function `ref` ('module:attr'), imported from the file it was located in at plan time."""
    module_name, _, attr = ref.partition(":")
    try:
        module = sys.modules.get(module_name)
        if module is None or Path(getattr(module, "__file__", "") or "").resolve() != Path(file).resolve():
            module = _import_file(module_name, Path(file))
    except Exception as err:  # noqa: BLE001  whatever the user's module raises on import is the finding
        raise RecipeError([f"importing {module_name!r} raised {type(err).__name__}: {err}"]) from err
    function = getattr(module, attr, None)
    if not callable(function):
        raise RecipeError([f"{attr!r} is not a callable in module {module_name!r}"])
    return function


def _import_file(module_name: str, file: Path):
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def strip_embedding_padding_idx(program):
    """Drop padding_idx from aten.embedding: it only matters for training, and it blocks the
    quantized-embedding fusion (leaving torchao::dequantize_affine without an out variant)."""
    import torch

    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default and len(node.args) > 2:
            node.args = node.args[:2]
    program.graph_module.recompile()
    return program
