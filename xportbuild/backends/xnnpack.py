"""XNNPACK backend: delegate what it supports, the rest runs on portable kernels."""


def partitioners(per_op_mode: bool) -> list:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner(per_op_mode=per_op_mode)]


def warm() -> None:
    """XNNPACK's pattern graphs (SDPA, bilinear upsampling), which its preprocess passes match each partition
    against: it builds them on first use by exporting and lowering small modules (about 2 s), once per process."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    sdpa.get_graphs()
    bilinear_2d.get_graphs()
