"""Core ML backend: Apple's Core ML runs the graph (CPU, GPU and Neural Engine) on macOS and iOS.

It lowers anywhere coremltools runs (it comes with executorch on Linux x86_64 and macOS arm64), but its runtime
is only in ExecuTorch builds for Apple platforms: elsewhere a target builds up to lower and its verify runs on a
machine that has the runtime, sharing the cache. A key/value cache becomes Core ML state (iOS 18, macOS 15)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DELEGATE = "CoreMLBackend"
RUNS_ON = "macOS or iOS: ExecuTorch's Apple builds, the pip package on an Apple-silicon Mac among them"
CI_RUNNER = "macos-14"  # Apple silicon: executorch's macOS wheel has the Core ML runtime
PACKAGES = ("coremltools",)
EXTRA = ""  # coremltools is an executorch dependency
FIXED_SHAPES = True  # a dynamic sequence length fails in coremltools' conversion (refusal)
_COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}


@dataclass(frozen=True)
class Options:
    """`compute_precision`: what Core ML computes in (the program stays float32; verify compares with it);
    `compute_units`: which processors Core ML may use."""

    compute_precision: Literal["float16", "float32"] = "float16"
    compute_units: Literal["all", "cpu_only", "cpu_and_gpu", "cpu_and_ne"] = "all"


def unavailable() -> str | None:
    from xportbuild.backends import version_problem

    return version_problem("coremltools", "9.", EXTRA)


def refusal(task: str) -> str | None:
    from xportbuild.backends import sequence_refusal

    return sequence_refusal(task, "coremltools 9.0 fails to convert its slices (\"Input squeeze_0 has rank 1 != "
                                  "other inputs rank 0\")")


def weight_problem(scheme: str, group_size: int) -> tuple[str, str] | None:
    return ("", f"{scheme!r}: torchao's quantized linears are not lowered to Core ML here yet; use linear = \"none\"")


def partitioners(options: Options, per_op_mode: bool) -> list:
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    precision = {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}[options.compute_precision]
    specs = CoreMLBackend.generate_compile_specs(compute_unit=getattr(ct.ComputeUnit, _COMPUTE_UNITS[options.compute_units]),
                                                 minimum_deployment_target=ct.target.iOS18, compute_precision=precision)
    class FloatStatePartitioner(CoreMLPartitioner):
        """Float buffers (a KV cache) become Core ML state; an integer one (a sliding-window cache's position
        counter) stays outside: Core ML keeps state in float16 only, and coremltools fails on an integer state
        ("KeyError: coreml_update_state(state=cumulative_length)"). The delegate then returns its new value."""

        def partition(self, exported_program):
            result = super().partition(exported_program)
            buffers = exported_program.graph_signature.inputs_to_buffers
            for node in exported_program.graph.nodes:
                value = node.meta.get("val")
                if node.name in buffers and "delegation_tag" in node.meta and not value.dtype.is_floating_point:
                    del node.meta["delegation_tag"]
            return result

    return [FloatStatePartitioner(compile_specs=specs, take_over_mutable_buffer=True)]
