"""Qualcomm QNN backend: named so that a recipe choosing it is refused before any work, with the reason."""

import os

DELEGATE = "QnnBackend"
RUNS_ON = "a Qualcomm device (Snapdragon) with the QNN runtime libraries"


def refusal(task: str) -> str | None:
    if not os.environ.get("QNN_SDK_ROOT"):
        return ("lowering to QNN needs Qualcomm's AI Engine Direct SDK and its x86 libraries (QNN_SDK_ROOT is not "
                "set)")
    return "xportbuild has no QNN lowering yet (its partitioner needs a chip model and SoC options it has no knobs for)"

