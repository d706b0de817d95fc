"""Pure planning: targets to stage nodes (what each stage reads, which stages feed it). No torch, no doit."""

from __future__ import annotations

from dataclasses import dataclass, field

from xportbuild import backends, passes
from xportbuild.keys import hash_file
from xportbuild.models.kinds import kind_of
from xportbuild.recipe.spec import QuantSpec, Target, as_dict, resolve_relative


@dataclass(frozen=True)
class StageNode:
    """One cached stage: `params` is exactly what it reads besides its `inputs` (upstream task names)."""

    stage: str
    subject: str
    params: dict
    inputs: dict[str, str] = field(default_factory=dict)
    origin: str = ""  # the model or recipe file it comes from: for messages and imports, not the key
    # Where the stage finds what its key identifies by content (a source's path as spelled), not the key: the same
    # weights reached as `../models/x` or by an absolute path, on this machine or another, are one fetch.
    locator: dict = field(default_factory=dict)

    @property
    def part(self) -> str:
        """The method a program or quantize node exports ("" for other stages)."""
        return self.params.get("method", "")

    @property
    def task(self) -> str:
        return f"{self.stage}:{self.subject}"


@dataclass(frozen=True)
class TargetPlan:
    target: Target
    verify: str
    programs: dict[str, str]  # lower's input name ("program", or "program.<method>") -> program or quantize task
    lower: str

    @property
    def program(self) -> str:
        return next(iter(self.programs.values()))


@dataclass(frozen=True)
class Plan:
    nodes: dict[str, StageNode]
    targets: dict[str, TargetPlan]

    def ancestors(self, task: str) -> list[str]:
        """`task` and every node it depends on, dependencies first."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            for upstream in self.nodes[name].inputs.values():
                visit(upstream)
            order.append(name)

        visit(task)
        return order


def _model_nodes(target: Target) -> dict[str, StageNode]:
    model = target.model
    keyed = {name: value for name, value in as_dict(model.source).items() if name != "path"}
    fetch = StageNode("fetch", model.name, {"source": keyed}, origin=model.file, locator={"path": model.source.path})
    reference = StageNode(
        "reference",
        model.name,
        {"task": model.task, "verify": as_dict(model.verify), "max_seq_len": model.max_seq_len},
        {"fetch": fetch.task},
    )
    return {fetch.task: fetch, reference.task: reference}


def _program_subject(target: Target) -> str:
    """Recipes of a model share its float program unless they export attention differently or compute in another
    dtype."""
    export = target.recipe.export
    attention = "custom-sdpa" if export.custom_sdpa else "custom-kv-cache" if export.custom_kv_cache else ""
    variants = [variant for variant in (attention, "" if export.dtype == "float32" else export.dtype,
                                        "one-token" if export.one_token else "") if variant]
    return ".".join([target.model.name, *variants])


def _group_scale_dtype(target: Target) -> str:
    return backends.group_scale_dtype(target.recipe.lower.backend)


def _method_nodes(target: Target, fetch_task: str, reference_task: str) -> dict[str, StageNode]:
    """One program or quantize node per method, under lower's input name for it ("program", or "program.<method>"
    for a kind of several methods): changing one method's quantization reruns only that method.

    A method the recipe leaves in float shares the model's float program of that method with every other recipe
    that exports attention the same way."""
    methods = kind_of(target.model.task).methods
    nodes = {}
    for method in methods:
        suffix = f".{method}" if len(methods) > 1 else ""
        params = {"task": target.model.task, "method": method, "max_seq_len": target.model.max_seq_len,
                  "export": as_dict(target.recipe.export)}
        quantize = target.recipe.quantize_for(method)
        if quantize.enabled:
            keyed, locator = _calibration(quantize, target.recipe.file)
            params = {**params, "quantize": keyed, "group_scale_dtype": _group_scale_dtype(target)}
            node = StageNode("quantize", f"{target.name}{suffix}", params,
                             {"fetch": fetch_task, "reference": reference_task}, target.recipe.file, locator)
        else:
            node = StageNode("program", f"{_program_subject(target)}{suffix}", params, {"fetch": fetch_task},
                             target.model.file)
        nodes[f"program{suffix}"] = node
    return nodes


def _calibration(quantize: QuantSpec, recipe_file: str) -> tuple[dict, dict]:
    """The quantization as keyed, with the calibration text by content (moved or renamed, it is the same text),
    and where the stage finds that text."""
    keyed = as_dict(quantize)
    if quantize.algorithm == "none":
        return keyed, {}
    path = resolve_relative(recipe_file, quantize.calibration)
    return {**keyed, "calibration": hash_file(path)}, {"calibration": str(path)}


def _verify_params(target: Target) -> dict:
    return {"tolerances": as_dict(target.tolerances), "task": target.model.task,
            "max_new_tokens": target.model.verify.max_new_tokens,
            "backends": list(target.recipe.lower.backends)}  # whose runtime runs the .pte


def plan_targets(targets: list[Target]) -> Plan:
    """The stage graph of every target; shared stages (fetch, reference, float program) appear once."""
    nodes: dict[str, StageNode] = {}
    plans: dict[str, TargetPlan] = {}
    for target in targets:
        model_nodes = _model_nodes(target)
        nodes.update(model_nodes)
        fetch_task, reference_task = list(model_nodes)
        programs = _method_nodes(target, fetch_task, reference_task)
        program_inputs = {name: node.task for name, node in programs.items()}
        located = passes.locate(target.recipe.lower.passes, target.recipe.file)
        lower_params = {
            "lower": as_dict(target.recipe.lower),
            "passes": [found.keyed() for found in located],
            "shared_table": target.recipe.quantize.tied_table == "shared",
            "target": target.name,  # the .pte's provenance names it
            "custom_ops": list(target.recipe.export.custom_ops),  # must survive lowering
        }
        lower = StageNode("lower", target.name, lower_params, program_inputs, origin=target.recipe.file,
                          locator={"pass_files": {found.ref: found.file for found in located}})
        replay = StageNode("replay", target.name, {"task": target.model.task},
                           {**program_inputs, "reference": reference_task}, origin=target.model.file)
        verify = StageNode(
            "verify",
            target.name,
            _verify_params(target),
            {"lower": lower.task, "replay": replay.task, **program_inputs, "reference": reference_task,
             "fetch": fetch_task},
            origin=target.model.file,
        )
        for node in (*programs.values(), replay, lower, verify):
            nodes[node.task] = node
        program = programs.get("program")
        if program is not None and program.stage == "quantize":  # the layer-group study: kinds of one method
            sensitivity = StageNode("sensitivity", target.name, program.params, program.inputs, target.recipe.file,
                                    program.locator)
            nodes[sensitivity.task] = sensitivity
        plans[target.name] = TargetPlan(target, verify.task, program_inputs, lower.task)
    return Plan(nodes, plans)

