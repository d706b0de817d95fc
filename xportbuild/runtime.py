"""Running a .pte in the ExecuTorch runtime (Python bindings), with the kernels our programs may need."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# CPU features that decide which kernels torch, XNNPACK and oneDNN pick, and so the last bits of every number.
KERNEL_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                   "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def load_kernels() -> None:
    """Register kernel libraries a .pte may reference; a missing one shows as load error 0x14."""
    import executorch.kernels.quantized  # noqa: F401  quantized embeddings

    from xportbuild.models.custom_attention import import_llama_ops

    import_llama_ops()  # custom SDPA / KV-cache kernels


def missing_kernels(program) -> dict[str, set[str]]:
    """{operator: methods using it} for each operator of an ExecuTorch program (the schema's Program) that this
    runtime has no kernel for, with the kernel libraries `load_kernels` registers. Delegated work is not listed:
    a delegate runs in its backend, which may live on another machine (runtime.py's callers say so)."""
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    load_kernels()
    kernels = set(_get_operator_names())
    missing: dict[str, set[str]] = {}
    for plan in program.execution_plan:
        for operator in plan.operators:
            name = f"{operator.name}.{operator.overload}" if operator.overload else operator.name
            if name not in kernels:
                missing.setdefault(name, set()).add(plan.name)
    return missing


def data_file(pte_path: Path) -> str | None:
    """The external weights (.ptd) published beside a .pte, if it has any."""
    path = Path(pte_path).with_suffix(".ptd")
    return str(path) if path.is_file() else None


def pte_call(pte_path: Path):
    """A `methods.Call` running methods of the program at `pte_path`."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    load_kernels()
    module = _load_for_executorch(str(pte_path), data_file(pte_path))

    def call(method: str, args: tuple):
        return module.run_method(method, args)[0]

    return call


def machine() -> dict:
    """Where numbers were measured: the CPU, its kernel-selecting features and the thread counts in use."""
    import torch
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                cpu = value.strip()
            elif name.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:  # not Linux: the architecture alone
        pass
    return {"cpu": cpu, "architecture": platform.machine(), "features": [f for f in KERNEL_FEATURES if f in flags],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "executorch_threads": _threadpool_get_thread_count(), "torch_kernels": torch.backends.cpu.get_cpu_capability()}


def describe_machine(facts: dict) -> str:
    """One line for reports: `AMD EPYC (x86_64; avx2 avx512f …), torch kernels AVX512, 2 torch threads`."""
    backend_facts = "".join(f", {name.replace('_', ' ')} {value}" for name, value in facts.items()
                            if name not in _MACHINE_FIELDS)
    return (f"{facts['cpu']} ({facts['architecture']}; {' '.join(facts['features']) or 'no listed features'}), "
            f"{facts['cores']} cores, torch kernels {facts['torch_kernels']}, threads: torch {facts['torch_threads']}, "
            f"ExecuTorch {facts.get('executorch_threads', '?')}{backend_facts}")


# What `machine` records; a backend's runtime adds what it chose there (its facts appear after these).
_MACHINE_FIELDS = ("cpu", "architecture", "features", "cores", "torch_threads", "executorch_threads", "torch_kernels")
