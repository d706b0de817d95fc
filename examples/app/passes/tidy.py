"""The app's own graph pass: run on each exported program before lowering."""

import torch


def constants_first_in_adds(program):
    """Puts the operands of additions in one order (addition commutes: the numbers stay)."""
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor and len(node.args) == 2:
            left, right = node.args
            if isinstance(right, torch.fx.Node) and isinstance(left, torch.fx.Node) and right.name < left.name:
                node.args = (right, left)
    program.graph_module.recompile()
    return program
