"""Lower stage: cached .pt2 programs -> backend passes -> to_edge_transform_and_lower -> .pte. No model load."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from xportbuild import __version__, backends, passes
from xportbuild.backends.shortcuts import LoweringShortcuts
from xportbuild.console import progress
from xportbuild.errors import StageError
from xportbuild.keys import code_digests, digest_value, library_versions
from xportbuild.pipeline import code_roots, node_backends, node_libraries
from xportbuild.recipe.spec import LowerSpec
from xportbuild.stages.program import MODEL_FACTS_FILE, load_target_programs, program_inputs

PTE_FILE = "model.pte"
# Weights stored outside the .pte (ExecuTorch's program-data separation): the shared tied table lives here,
# because only an external data file lets a delegate and a plain kernel read the same bytes.
DATA_FILE = "model.ptd"
_DATA_TAG = DATA_FILE.removesuffix(".ptd")
PROVENANCE_METHOD = "get_provenance"
DELEGATES_FILE = "delegates.json"  # the backend ids the .pte's delegates carry: what its runtime must have registered


def _delegation(edge, methods) -> dict:
    """Per method: ops left outside any delegate and the number of delegate calls."""
    report = {}
    for method in methods:
        graph = edge.exported_program(method).graph
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_function" and "getitem" not in str(n.target))
        delegated = sum(count for name, count in calls.items() if "call_delegate" in name)
        report[method] = {"delegate_calls": delegated, "ops_outside_delegates": sum(calls.values()) - delegated}
    return report


def constant_methods(program_dir: Path, provenance: dict) -> dict:
    """Runner metadata recorded by the program stage, plus `get_provenance`: a JSON string saying what built this.
    (Every program of a target records the same metadata: the first one is read.)"""
    facts = json.loads((program_dir / MODEL_FACTS_FILE).read_text())
    record = {"libraries": library_versions(), **provenance, "source": facts["source"], "xportbuild": __version__}
    return {**facts["runner"], PROVENANCE_METHOD: json.dumps(record, sort_keys=True)}


def lower(program_dirs: list[Path], spec: LowerSpec, pass_files: dict[str, str], out_dir: Path,
          shared_table: bool = False, provenance: dict | None = None, custom_ops: tuple[str, ...] = ()) -> dict:
    """Write out_dir/model.pte (and model.ptd when a table is shared) holding every method of `program_dirs`;
    returns sizes and delegation facts."""
    import torch
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    programs = load_target_programs(program_dirs)
    functions = {name: getattr(passes, name) for name in passes.EVERY_LOWERING}
    functions.update({ref: passes.load(ref, file) for ref, file in pass_files.items()})
    table_shapes = _shared_table_shapes(programs) if shared_table else set()
    shortcuts = LoweringShortcuts()
    # Lowering a loaded program with autograd on fails on the KV cache's in-place copy_.
    phases = progress(total=3, desc="lowering: passes, edge and partitions, serialization", unit="phase")
    with torch.no_grad(), shortcuts.lowering(), phases:
        for method, program in programs.items():
            for ref, function in functions.items():
                program = passes.apply(function, program, ref)
            programs[method] = program
        phases.update()
        with shortcuts.executorch():
            with shortcuts.edge_conversion():
                edge = to_edge_transform_and_lower(
                    programs,
                    constant_methods=constant_methods(program_dirs[0], provenance or {}),
                    transform_passes=[_tag_tables(table_shapes)] if table_shapes else None,
                    partitioner=backends.partitioners(spec),
                    compile_config=EdgeCompileConfig(_check_ir_validity=False),
                )
            delegation = _delegation(edge, programs)
            phases.update()
            executorch_program = edge.to_executorch(
                ExecutorchBackendConfig(
                    extract_delegate_segments=spec.extract_delegate_segments, do_quant_fusion_and_const_prop=True,
                    external_constants=_external_tag if table_shapes else False,
                )
            )
            phases.update()
    _check_runnable(executorch_program)
    llama_ops = _check_custom_ops(executorch_program, programs, custom_ops)
    path = out_dir / PTE_FILE
    path.write_bytes(executorch_program.buffer)
    delegates = sorted({delegate.id for plan in executorch_program.executorch_program.execution_plan
                        for delegate in plan.delegates})
    (out_dir / DELEGATES_FILE).write_text(json.dumps(delegates))
    facts = {"pte_bytes": path.stat().st_size, "backend": spec.backend, "delegation": delegation, "llama_ops": llama_ops,
             "delegates": delegates, **shortcuts.facts()}
    if table_shapes:
        executorch_program.write_tensor_data_to_file(str(out_dir))
        facts["ptd_bytes"] = (out_dir / DATA_FILE).stat().st_size
        facts["shared_table"] = _check_stored_once(table_shapes, facts["ptd_bytes"])
    facts["artifact_bytes"] = facts["pte_bytes"] + facts.get("ptd_bytes", 0)
    return facts


def _check_custom_ops(executorch_program, methods, custom_ops: tuple[str, ...]) -> dict[str, int]:
    """Counts of llama:: ops in the final program (the edge graph still holds update_cache functionalized);
    raises if one the recipe asked for, and the method's program held, is gone."""
    from xportbuild.models.custom_attention import llama_op_counts, missing_ops

    total: Counter = Counter()
    for method, program in methods.items():
        held = llama_op_counts(program)
        counts = llama_op_counts(executorch_program.exported_program(method))
        if missing := missing_ops(counts, tuple(op for op in custom_ops if held[op])):
            raise StageError(f"lower: {', '.join(missing)} requested by the recipe but absent from method {method} "
                             "after lowering")
        total += counts
    return dict(total)


def _shared_table_shapes(programs) -> set[tuple[int, ...]]:
    """Shapes of 8-bit tables that appear twice with identical codes (a tied embedding and head, which the
    quantize stage checked)."""
    import xxhash

    seen: dict[tuple, int] = Counter()
    for program in programs.values():
        for value in program.state_dict.values():
            codes = getattr(value, "qdata", None)
            if codes is not None and str(codes.dtype) == "torch.int8" and codes.dim() == 2:
                seen[(tuple(codes.shape), xxhash.xxh3_64_hexdigest(codes.contiguous().numpy().tobytes()))] += 1
    # Empty for an untied model: the quantize stage reported that sharing does not apply.
    return {shape for (shape, _), count in seen.items() if count >= 2}


def _check_runnable(executorch_program) -> None:
    """A program whose operators the ExecuTorch runtime has no kernel for never leaves lower: verify would find it only
    after replay, at its first call (error 0x14)."""
    from xportbuild.runtime import missing_kernels

    missing = missing_kernels(executorch_program.executorch_program)
    if not missing:
        return
    found = "; ".join(f"{op} (method {', '.join(sorted(methods))}, {_made_by(executorch_program, methods, op)})"
                      for op, methods in sorted(missing.items()))
    raise StageError(f"the .pte would not run: the ExecuTorch runtime has no kernel for {found}; decompose the "
                     "operator in a lowering pass, or leave it to a backend that runs it")


def _made_by(executorch_program, methods: set[str], operator: str) -> str:
    """The model source line the operator came from (torch.export's stack trace), or that a pass inserted it."""
    wanted = operator.replace("::", ".")
    for method in sorted(methods):
        for node in executorch_program.exported_program(method).graph.nodes:
            if node.op == "call_function" and wanted in str(node.target):
                return _source_line(node.meta.get("stack_trace") or "")
    return "source unknown"


def _source_line(stack_trace: str) -> str:
    """`file:line: code` of a stack trace's innermost frame (Python's caret lines skipped)."""
    lines = [line.strip() for line in stack_trace.strip().splitlines() if line.strip().strip("^~")]
    frames = [index for index, line in enumerate(lines) if line.startswith('File "')]
    if not frames:
        return "inserted by a lowering pass (no model source line)"
    where = lines[frames[-1]].split('"')
    line = where[2].split(",")[1].strip().removeprefix("line ") if len(where) > 2 else "?"
    code = lines[frames[-1] + 1] if frames[-1] + 1 < len(lines) else ""
    return f"from {Path(where[1]).name}:{line}: {code}"


def _tag_tables(shapes: set[tuple[int, ...]]):
    """Edge pass: mark the shared table's constants for the external data file, in the delegate and outside it."""
    def tag(graph_module):
        from executorch.exir.pass_base import PassResult

        for node in graph_module.graph.nodes:
            value = node.meta.get("val")
            if node.op == "placeholder" and value is not None and str(value.dtype) == "torch.int8" \
                    and tuple(value.shape) in shapes:
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = _DATA_TAG
        return PassResult(graph_module, True)

    return tag


def _external_tag(node) -> str | None:
    return node.meta.get("custom", {}).get("delegate_constant_tag")


def _check_stored_once(shapes: set[tuple[int, ...]], ptd_bytes: int) -> dict:
    """The data file must hold each shared table once: ExecuTorch merges identical buffers, but only if they match."""
    table_bytes = sum(math.prod(shape) for shape in shapes)
    if ptd_bytes >= 2 * table_bytes:
        raise StageError(f"lower: the shared table was stored twice ({ptd_bytes} bytes for {table_bytes}-byte "
                         "tables): the embedding and head codes differ after lowering")
    return {"shapes": sorted(list(shape) for shape in shapes), "table_bytes": table_bytes}


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    lower_params = dict(node.params["lower"])
    spec = LowerSpec(**{**lower_params, "passes": tuple(lower_params["passes"])})
    # An entry's folder is named by its key: the provenance names the exact programs lowered.
    programs = program_inputs(inputs)
    if missing := backends.unavailable_here(node_backends(node)):  # validate says so too, before any work
        raise StageError(f"lower: a backend cannot lower here: {missing}")
    provenance = {"target": node.subject, "lower_params": node.params, "libraries": node_libraries(node),
                  "lower_code": digest_value(code_digests(code_roots(node)))}
    if "program" in programs:
        provenance["program_key"] = programs["program"].name
    else:
        provenance["program_keys"] = {name.removeprefix("program."): folder.name for name, folder in programs.items()}
    pass_files = {found["ref"]: node.locator["pass_files"][found["ref"]] for found in node.params["passes"]}
    return lower(list(programs.values()), spec, pass_files, out_dir,
                 node.params["shared_table"], provenance, tuple(node.params["custom_ops"]))
