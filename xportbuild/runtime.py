"""Running a .pte in the ExecuTorch runtime (Python bindings), with the kernels our programs may need."""

from __future__ import annotations

from pathlib import Path


def load_kernels() -> None:
    """Register kernel libraries a .pte may reference; a missing one shows as load error 0x14."""
    import executorch.kernels.quantized  # noqa: F401  quantized embeddings

    from xportbuild.models.custom_attention import import_llama_ops

    import_llama_ops()  # custom SDPA / KV-cache kernels


def data_file(pte_path: Path) -> str | None:
    """The external weights (.ptd) published beside a .pte, if it has any."""
    path = Path(pte_path).with_suffix(".ptd")
    return str(path) if path.is_file() else None


def method_step(pte_path: Path, method: str = "forward"):
    """A causal LM `Step` calling `method` of the program at `pte_path`."""
    call = pte_call(pte_path)

    def step(input_ids, cache_position):
        return call(method, (input_ids, cache_position))

    return step


def pte_call(pte_path: Path):
    """A `methods.Call` running methods of the program at `pte_path`."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    load_kernels()
    module = _load_for_executorch(str(pte_path), data_file(pte_path))

    def call(method: str, args: tuple):
        return module.run_method(method, args)[0]

    return call
