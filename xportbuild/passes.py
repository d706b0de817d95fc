"""Graph passes a recipe can name: a literal registry of built-ins, or `module:attr` from the user's repo.

A pass takes an ExportedProgram and returns one. Its source file is part of the lower key.
"""

from __future__ import annotations

import contextlib
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
# Built-ins every lowering runs before any pass a recipe names: the last two rewrite operators the ExecuTorch runtime
# has no kernel for into ones it has.
EVERY_LOWERING = ("strip_embedding_padding_idx", "sort_as_topk", "complex_as_real")


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


def sort_as_topk(program):
    """aten.sort as aten.topk over the whole dim (k = its size, sorted): the same values and an order of indices as
    valid (a sort that is not stable orders equal values any way). MoE routers sort their expert ids (JetMoE)."""
    import torch

    graph = program.graph_module.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.sort.default]:
        source = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        descending = node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False)
        with graph.inserting_before(node):
            size = _fake_call(graph, torch.ops.aten.sym_size.int, (source, dim))
            topk = _fake_call(graph, torch.ops.aten.topk.default, (source, size, dim, descending, True), like=node)
        node.replace_all_uses_with(topk)
        graph.erase_node(node)
    program.graph_module.recompile()
    return program


def _fake_call(graph, target, args: tuple, like=None):
    """A call_function node with the `val` meta its target gives on its inputs' fake values (later passes read it)."""
    import torch

    node = graph.call_function(target, args)
    if like is not None:
        node.meta.update({key: value for key, value in like.meta.items() if key != "val"})
    values = torch.fx.node.map_arg(args, lambda arg: arg.meta["val"])
    fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(values))
    with fake_mode or contextlib.nullcontext():
        node.meta["val"] = target(*values)
    return node


def complex_as_real(program):
    """Complex rotary embeddings (Llama 4: torch.polar, view_as_complex, a complex product, view_as_real) in real
    arithmetic, each complex value as its real and imaginary parts. Left as it is when a complex value meets an
    operator not rewritten here (lower then names that operator)."""
    import torch

    aten = torch.ops.aten
    same_values, shape_ops = _complex_ops()
    graph = program.graph_module.graph
    complex_nodes = [node for node in graph.nodes if node.op == "call_function" and
                     (_is_complex(node) or node.target == aten.view_as_real.default)]
    if not complex_nodes or not all(_rewritable(node) for node in complex_nodes):
        return program
    parts: dict = {}  # complex node -> (real part, imaginary part)
    for node in complex_nodes:
        with graph.inserting_before(node):
            if node.target == aten.polar.default:
                magnitude, angle = node.args
                cos, sin = (_fake_call(graph, function, (angle,)) for function in (aten.cos.default, aten.sin.default))
                parts[node] = tuple(_fake_call(graph, aten.mul.Tensor, (magnitude, wave)) for wave in (cos, sin))
            elif node.target == aten.view_as_complex.default:
                parts[node] = tuple(_fake_call(graph, aten.select.int, (node.args[0], -1, part)) for part in (0, 1))
            elif node.target == aten.mul.Tensor and not all(arg in parts for arg in node.args):  # by a real factor
                number, factor = node.args if node.args[0] in parts else node.args[::-1]
                parts[node] = tuple(_fake_call(graph, aten.mul.Tensor, (part, factor)) for part in parts[number])
            elif node.target == aten.mul.Tensor:
                (a, b), (c, d) = parts[node.args[0]], parts[node.args[1]]
                ac, bd, ad, bc = (_fake_call(graph, aten.mul.Tensor, pair) for pair in ((a, c), (b, d), (a, d), (b, c)))
                parts[node] = (_fake_call(graph, aten.sub.Tensor, (ac, bd)), _fake_call(graph, aten.add.Tensor, (ad, bc)))
            elif node.target in same_values:
                parts[node] = parts[node.args[0]]
            elif node.target in shape_ops:
                parts[node] = tuple(_fake_call(graph, node.target, (part, *node.args[1:])) for part in parts[node.args[0]])
            else:  # view_as_real: the parts side by side in a last dim of 2
                node.replace_all_uses_with(_fake_call(graph, aten.stack.default, (list(parts[node.args[0]]), -1)))
    for node in reversed(complex_nodes):
        for check in [user for user in node.users if user.target == aten._assert_tensor_metadata.default]:
            graph.erase_node(check)  # the complex value it checked is gone
        graph.erase_node(node)
    program.graph_module.recompile()
    return program


def _is_complex(node) -> bool:
    import torch

    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_complex()


def _complex_ops():
    import torch

    aten = torch.ops.aten
    same_values = {aten.to.dtype_layout, aten.to.dtype, aten._to_copy.default, aten.clone.default}
    shape_ops = {aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor}
    return same_values, shape_ops


def _rewritable(node) -> bool:
    import torch

    aten = torch.ops.aten
    same_values, shape_ops = _complex_ops()
    complex_inputs = all(isinstance(arg, torch.fx.Node) and _is_complex(arg) for arg in node.args[:1])
    if node.target in (aten.polar.default, aten.view_as_complex.default):
        return True
    if node.target == aten.mul.Tensor:  # of two complex values, or of one by a real number or tensor
        return any(isinstance(arg, torch.fx.Node) and _is_complex(arg) for arg in node.args)
    if node.target in same_values:  # a cast to the same complex dtype, or a copy
        return complex_inputs and node.kwargs.get("dtype", node.meta["val"].dtype) == node.args[0].meta["val"].dtype
    return complex_inputs and (node.target in shape_ops or node.target == aten.view_as_real.default)
