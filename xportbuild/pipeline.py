"""The stages, in pipeline order, and the code each one runs: what a stage's key covers besides its inputs and
parameters. Its own module, so that a change to planning does not make every stage that names its code stale."""

from __future__ import annotations

from dataclasses import dataclass

from xportbuild import backends
from xportbuild.models.kinds import kind_of


@dataclass(frozen=True)
class Stage:
    """A cached stage: its name, the function that runs it ("module:function") and what it does. `decides`: its
    output is what publishing rests on (the weights, the float model's outputs, the verdict), so a shared store's
    entry of it is used only when signed with the store's key or when the store is declared trusted (remote.py)."""

    name: str
    runner: str
    doc: str
    decides: bool = False

    @property
    def module(self) -> str:
        return self.runner.partition(":")[0]


# The one list of stages, in pipeline order.
STAGES: tuple[Stage, ...] = (
    Stage("fetch", "xportbuild.stages.fetch:run", "fetch weights and tokenizer of a model into the cache", decides=True),
    Stage("reference", "xportbuild.stages.reference:run", "run the float eager model on its verification prompts",
          decides=True),
    Stage("program", "xportbuild.stages.program:run", "torch.export the float model, one .pt2 per method"),
    Stage("quantize", "xportbuild.stages.quantize:run", "quantize with torchao and torch.export, one .pt2 per method"),
    Stage("replay", "xportbuild.stages.replay:run",
          "run the exported programs on the reference's recorded calls (verify's program side, once per program)"),
    Stage("lower", "xportbuild.stages.lower:run", "lower the cached programs to an ExecuTorch .pte"),
    Stage("verify", "xportbuild.stages.verify:run",
          "run the .pte in the ExecuTorch runtime and compare with the references", decides=True),
    Stage("sensitivity", "xportbuild.stages.sensitivity:run",
          "opt-in, slow: quality with each layer group in float or 8 bits (not part of export)"),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def code_roots(node) -> tuple[str, ...]:
    """The modules a stage reaches by name rather than by import: its runner, the wrapper of its model's task kind,
    its backend. Its key covers their import closure (`keys.code_digests`); the app's passes enter it by content."""
    roots = [STAGE_BY_NAME[node.stage].module]
    if task := node.params.get("task"):
        roots.append(kind_of(task).module)
    roots += [backends.REGISTRY[name] for name in node_backends(node)]
    return tuple(roots)


def node_backends(node) -> tuple[str, ...]:
    """The backends a lower node lowers with, or whose runtime a verify node runs."""
    if lower := node.params.get("lower"):
        return tuple(name for name in (lower["backend"], lower.get("fallback", "")) if name)
    return tuple(node.params.get("backends", ()))


def node_libraries(node) -> dict[str, str]:
    """The versions of the libraries a stage runs: the fixed stack's, and its backends' packages."""
    from xportbuild.keys import library_versions

    return {**library_versions(), **backends.package_versions(node_backends(node))}
