"""XNNPACK backend: delegate what it supports, the rest runs on portable kernels."""


def partitioners(per_op_mode: bool) -> list:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner(per_op_mode=per_op_mode)]
