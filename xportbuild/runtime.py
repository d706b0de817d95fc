"""Running a .pte in the ExecuTorch runtime (Python bindings), with the kernels our programs may need."""

from __future__ import annotations

from pathlib import Path


def load_kernels() -> None:
    """Register kernel libraries a .pte may reference; a missing one shows as load error 0x14."""
    import executorch.kernels.quantized  # noqa: F401  quantized embeddings
    from executorch.extension.llm import custom_ops  # noqa: F401  custom SDPA / KV-cache ops


def method_step(pte_path: Path, method: str = "forward"):
    """A `Step` calling `method` of the program at `pte_path`."""
    import torch
    from executorch.runtime import Runtime

    load_kernels()
    program = Runtime.get().load_program(Path(pte_path))
    loaded = program.load_method(method)

    def step(input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return loaded.execute([input_ids, cache_position])[0]

    return step
