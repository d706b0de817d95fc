"""Graph passes a recipe can name: a literal registry of built-ins, or `module:attr` from the user's repo.

A pass takes an ExportedProgram and returns one. Its source file is part of the lower key.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from xportbuild.errors import RecipeError
from xportbuild.keys import module_source_digest

REGISTRY: dict[str, str] = {
    "strip_embedding_padding_idx": "xportbuild.passes:strip_embedding_padding_idx",
}


def repo_root(recipe_file: str) -> Path:
    """The folder holding recipes/, from which `module:attr` passes are imported."""
    return Path(recipe_file).resolve().parent.parent.parent


def _reference(name: str) -> str:
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise KeyError(f"unknown pass {name!r}: use one of {', '.join(sorted(REGISTRY))} or 'module:attr'")
    return name


def fingerprints(names: tuple[str, ...], recipe_file: str) -> list[dict]:
    """[{name, ref, source}] for the lower key; the module is located, not imported."""
    root = str(repo_root(recipe_file))
    if root not in sys.path:
        sys.path.append(root)
    result, problems = [], []
    for name in names:
        try:
            ref = _reference(name)
            result.append({"name": name, "ref": ref, "source": module_source_digest(ref.split(":")[0])})
        except (KeyError, ModuleNotFoundError, ImportError, ValueError) as err:
            problems.append(f"{recipe_file}: lower.passes: {name!r}: {err}")
    if problems:
        raise RecipeError(problems)
    return result


def import_problems(names: tuple[str, ...], recipe_file: str) -> list[str]:
    """Each named pass imported and checked to be callable (validate's job: lower would fail on it much later)."""
    problems = []
    for name in names:
        try:
            resolve(_reference(name), str(repo_root(recipe_file)))
        except (KeyError, RecipeError) as err:
            problems.append(f"{recipe_file}: lower.passes: {name!r}: {err.problems[0] if isinstance(err, RecipeError) else err}")
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


def resolve(ref: str, recipe_root: str):
    """The pass function named by `ref` ('module:attr')."""
    if recipe_root not in sys.path:
        sys.path.append(recipe_root)
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001  whatever the user's module raises on import is the finding
        raise RecipeError([f"importing {module_name!r} raised {type(err).__name__}: {err}"]) from err
    function = getattr(module, attr, None)
    if not callable(function):
        raise RecipeError([f"{attr!r} is not a callable in module {module_name!r}"])
    return function


def strip_embedding_padding_idx(program):
    """Drop padding_idx from aten.embedding: it only matters for training, and it blocks the
    quantized-embedding fusion (leaving torchao::dequantize_affine without an out variant)."""
    import torch

    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default and len(node.args) > 2:
            node.args = node.args[:2]
    program.graph_module.recompile()
    return program
