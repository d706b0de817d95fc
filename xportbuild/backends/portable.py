"""Portable backend: no delegate, every op runs on ExecuTorch's portable (and quantized) kernels."""

DELEGATE = None
RUNS_ON = "every ExecuTorch runtime"
DTYPES = ("float32", "float16", "bfloat16")


def partitioners(options, per_op_mode: bool) -> list:
    return []


def weight_problem(scheme: str, group_size: int) -> tuple[str, str] | None:
    return ("", f"{scheme!r}: the portable backend has no kernels for quantized linears (only embeddings); use "
                "backend = \"xnnpack\" or \"none\"")
