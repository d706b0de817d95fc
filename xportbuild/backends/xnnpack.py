"""XNNPACK backend: delegate what it supports, the rest runs on portable kernels.

Its partitioner takes ExecuTorch's own configs, with one constraint added where XNNPACK's node visitor refuses at
preprocess what the partitioner accepted (the lowering then fails): such a node is left out of the partition and
runs on portable kernels instead."""

from __future__ import annotations

DELEGATE = "XnnpackBackend"
RUNS_ON = "every ExecuTorch runtime built with XNNPACK (the pip package's among them)"
DTYPES = ("float32", "float16", "bfloat16")
PER_OP_MODE = True
GROUP_SCALE_DTYPE = "bfloat16"


def weight_problem(scheme: str, group_size: int) -> tuple[str, str] | None:
    """(the knob's suffix, why) when XNNPACK has no kernel for weights of `scheme` in groups of `group_size`."""
    if group_size % 32:
        return "_group_size", f"{group_size}: XNNPACK needs a multiple of 32 (or 0 for per-channel)"
    if group_size and scheme.endswith("8w"):
        return "_group_size", (f"{group_size}: XNNPACK has no group-wise kernels for 8-bit weights (its runtime "
                               "rejects them); use 0 for per-channel")
    return None


def partitioners(options, per_op_mode: bool) -> list:
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    constrained = {config.__name__: config for config in (_max_dim_config(),)}
    configs = [constrained.get(config.__name__, config) for config in ALL_PARTITIONER_CONFIGS]
    return [XnnpackPartitioner(configs=configs, per_op_mode=per_op_mode)]


def _max_dim_config():
    """max.dim: the partitioner takes any dimension of a 4-D input; the visitor (op_max_dim.py) only dims 2 and 3,
    written so, with keepdim given. Upstream, the partitioner config would check what its visitor checks."""
    from executorch.backends.xnnpack.partition.config.node_configs import MaxDimConfig
    from executorch.backends.xnnpack.partition.config.node_configs import why

    class ConstrainedMaxDimConfig(MaxDimConfig):
        def check_constraints(self, node, ep) -> bool:
            if len(node.args) != 3 or node.args[1] not in (2, 3):
                why(node, f"XNNPACK's max.dim takes dim 2 or 3 with keepdim, not {node.args[1:]}")
                return False
            return super().check_constraints(node, ep)

    ConstrainedMaxDimConfig.__name__ = MaxDimConfig.__name__
    return ConstrainedMaxDimConfig
