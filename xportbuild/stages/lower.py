"""Lower stage: cached .pt2 programs -> backend passes -> to_edge_transform_and_lower -> .pte. No model load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from xportbuild import backends, passes
from xportbuild.recipe.spec import LowerSpec
from xportbuild.stages.program import load_programs

PTE_FILE = "model.pte"


def _delegation(edge, methods) -> dict:
    """Per method: ops left outside any delegate and the number of delegate calls."""
    report = {}
    for method in methods:
        graph = edge.exported_program(method).graph
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_function" and "getitem" not in str(n.target))
        delegated = sum(count for name, count in calls.items() if "call_delegate" in name)
        report[method] = {"delegate_calls": delegated, "ops_outside_delegates": sum(calls.values()) - delegated}
    return report


def lower(program_dir: Path, spec: LowerSpec, pass_refs: list[str], repo_root: str, out_dir: Path) -> dict:
    """Write out_dir/model.pte; returns size and delegation facts."""
    import torch
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    programs = load_programs(program_dir)
    functions = [passes.strip_embedding_padding_idx] + [passes.resolve(ref, repo_root) for ref in pass_refs]
    # Lowering a loaded program with autograd on fails on the KV cache's in-place copy_.
    with torch.no_grad():
        for method, program in programs.items():
            for function in functions:
                program = function(program)
            programs[method] = program
        edge = to_edge_transform_and_lower(
            programs,
            partitioner=backends.partitioners(spec.backend, spec.per_op_mode),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        delegation = _delegation(edge, programs)
        executorch_program = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=spec.extract_delegate_segments, do_quant_fusion_and_const_prop=True
            )
        )
    path = out_dir / PTE_FILE
    path.write_bytes(executorch_program.buffer)
    return {"pte_bytes": path.stat().st_size, "backend": spec.backend, "delegation": delegation}


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    lower_params = dict(node.params["lower"])
    spec = LowerSpec(**{**lower_params, "passes": tuple(lower_params["passes"])})
    refs = [p["ref"] for p in node.params["passes"]]
    return lower(inputs["program"], spec, refs, str(passes.repo_root(node.origin)), out_dir)
