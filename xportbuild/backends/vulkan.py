"""Vulkan backend: named so that a recipe choosing it is refused before any work, with what was measured."""

DELEGATE = "VulkanBackend"
RUNS_ON = "an ExecuTorch runtime built with Vulkan (Android, or a desktop GPU driver)"


def refusal(task: str) -> str | None:
    return (f"ExecuTorch 1.4.1's Vulkan backend does not lower a transformer of task {task!r}: a Llama fails in its "
            "FuseBatchNormPass or in flatc (-Infinity in the serialized schema JSON); only plain MLPs lowered")

