"""Portable backend: no delegate, every op runs on ExecuTorch's portable (and quantized) kernels."""


def partitioners(per_op_mode: bool) -> list:
    return []
