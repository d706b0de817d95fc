"""OpenVINO backend: the whole graph one delegate, compiled by OpenVINO for a device and run by its plugin.

Its CPU plugin chooses its own inference precision when the runtime imports the compiled model: bfloat16 on a CPU
with AVX512-BF16 or AMX, float32 elsewhere. The runtime passes no configuration on import (only the device), so a
recipe cannot turn it off; verify records the precision the plugin chose (`runtime_facts`) and recipes gate on the
spread measured with bfloat16."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DELEGATE = "OpenvinoBackend"
RUNS_ON = "an ExecuTorch runtime built with OpenVINO (the pip package's, with `openvino` installed)"
# The runtime loads OpenVINO's C library from the `openvino` package: 2026 releases changed what it links.
# The backend package imports nncf even to partition; nncf 3.4 and 2.19 fail there.
PACKAGES = ("openvino", "nncf")
EXTRA = "openvino"
_SERIES = {"openvino": "2025.", "nncf": "3.2."}
FIXED_SHAPES = True  # a dynamic sequence length fails in OpenVINO's compile (refusal)


@dataclass(frozen=True)
class Options:
    """`device`: the OpenVINO device the model is compiled for and run on."""

    device: Literal["CPU", "GPU", "NPU"] = "CPU"


def unavailable() -> str | None:
    from xportbuild.backends import version_problem

    problems = [found for package, series in _SERIES.items() if (found := version_problem(package, series, EXTRA))]
    return "; ".join(problems) or None


def refusal(task: str) -> str | None:
    from xportbuild.backends import sequence_refusal

    return sequence_refusal(task, "OpenVINO's compile rejects it (\"Value for partial shape evaluation can't be "
                                  "lower than zero\")")


def weight_problem(scheme: str, group_size: int) -> tuple[str, str] | None:
    # Measured on a tiny Llama: 8w leaves torchao's dequantize_affine outside the delegate, which ExecuTorch has no
    # kernel for ("Missing out variants"); 8da4w fails in lowering ("Buffer output ... does not point to a buffer").
    # OpenVINO's own weight compression (nncf, a pt2e flow) is another quantization path, not built here.
    return ("", f"{scheme!r}: torchao's quantized linears do not lower to OpenVINO in ExecuTorch 1.4.1 (8w leaves "
                "dequantize_affine outside the delegate, 8da4w fails in lowering); use linear = \"none\"")


def partitioners(options: Options, per_op_mode: bool) -> list:
    from executorch.backends.openvino.partitioner import OpenvinoPartitioner
    from executorch.exir.backend.backend_details import CompileSpec

    class WholePartitioner(OpenvinoPartitioner):
        """Sizes and constants inside the partition. OpenVINO converts `aten.sym_size.int`, but the partitioner
        looks it up by its short name and leaves it out, so the partition takes the size as a SymInt input that
        OpenVINO's compile cannot type. A constant the KV cache's update reads is left out as if it were the mutated
        buffer, and reaches the delegate as a 0-d input that the runtime cannot hand to OpenVINO (error 0x1)."""

        def capture_nncf_patterns(self, graph_module):
            super().capture_nncf_patterns(graph_module)
            self._enabled_ops_by_name.update(node.name for node in graph_module.graph.nodes
                                             if node.op == "call_function" and "sym_size" in str(node.target))

        def partition(self, exported_program):
            result = super().partition(exported_program)
            signature = exported_program.graph_signature
            read_only = {**signature.inputs_to_lifted_tensor_constants, **signature.inputs_to_buffers}
            mutated = set(signature.buffers_to_mutate.values())
            for node in exported_program.graph.nodes:
                if node.op != "placeholder" or node.name not in read_only or read_only[node.name] in mutated:
                    continue  # a user input, or the buffer the cache update writes
                tags = {user.meta.get("delegation_tag") for user in node.users}
                if len(tags) == 1 and None not in tags:
                    node.meta["delegation_tag"] = tags.pop()
            return result

    return [WholePartitioner([CompileSpec("device", options.device.encode())])]


def runtime_facts() -> dict:
    """The inference precision OpenVINO's CPU plugin picks on this machine (what the runtime will compute in)."""
    from openvino import Core

    return {"openvino_cpu_inference_precision": Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()}
