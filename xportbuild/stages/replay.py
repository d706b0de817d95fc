"""Replay stage: the exported programs on the reference's recorded calls, once per program.

What verify compares the .pte with on the program's side (its outputs on every recorded call, and its choices fed
the float outcome) depends on the programs and the reference only, so it is computed here and cached by their keys:
a lowering change reruns lower and verify, and verify pays only for the .pte. Outputs are stored as computed
(float32): verify compares the .pte with them at fp32 tolerances."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xportbuild.console import progress
from xportbuild.errors import StageError
from xportbuild.cache import reading_entry
from xportbuild.models.kinds import kind_of
from xportbuild.quality import one_thread

if TYPE_CHECKING:
    from xportbuild.models.methods import Outcome

OUTPUTS_FILE = "program_outputs.npz"


def program_results(program_dirs: list[Path], samples: list, task: str) -> Iterator[tuple[list, Outcome]]:
    """Per sample: the programs' output on each recorded call (None where the call is not theirs), and their
    forced run (fed the float outcome: their choice and scores at each step)."""
    from xportbuild.models.methods import Memo, program_call, replay, sequence_call
    from xportbuild.stages.program import MODEL_FACTS_FILE, load_target_programs

    kind = kind_of(task)
    wrapper, methods = kind.wrapper(), set(kind.methods)
    facts = json.loads((program_dirs[0] / MODEL_FACTS_FILE).read_text())["runner"]
    call = sequence_call(program_call(load_target_programs(program_dirs)), facts)
    for sample in progress(samples, desc="the programs on the reference's samples", unit="sample"):
        memo = Memo(call)  # the forced run repeats the replayed calls (a causal LM's): answered from memory
        outputs = replay(memo, sample, methods)
        yield outputs, wrapper.run(memo, sample.inputs, facts, len(sample.outcome.tokens), forced=sample.outcome.tokens)


def replay_programs(program_dirs: list[Path], reference_dir: Path, task: str, out_dir: Path) -> dict:
    from xportbuild.models.methods import NpzWriter, load_samples

    samples = load_samples(reference_dir)
    # Written sample by sample: the default target's outputs are 675 MB of float32, not held until the end.
    with one_thread(), NpzWriter(out_dir / OUTPUTS_FILE) as arrays:  # one thread: stored, so hashed into verify's key
        for i, (outputs, forced) in enumerate(program_results(program_dirs, samples, task)):
            for j, output in enumerate(outputs):
                if output is not None:
                    _check_finite(output, i, j)
                    arrays.add(f"s{i}.c{j}.out", output)
            arrays.add(f"s{i}.forced.tokens", np.array(forced.tokens, dtype=np.int64))
            scores = np.stack(forced.scores) if forced.scores else np.zeros((0, 0), np.float32)  # no choice made
            if (j := _holding(outputs, scores)) is None:
                arrays.add(f"s{i}.forced.scores", scores)
            else:
                arrays.add(f"s{i}.forced.in", np.array(j))
    return {"samples": len(samples)}


def _check_finite(output: np.ndarray, sample: int, call: int) -> None:
    """A program whose outputs overflow (a model computing in float16 past 65504: Gemma 3's activations do) is
    stopped here, before its lowering: no .pte of it could pass verify. -inf is a score some models give on purpose
    (a vocabulary's padding entries)."""
    if output.dtype.kind == "f" and (np.isnan(output).any() or np.isposinf(output).any()):
        raise StageError(f"the exported program's output holds NaN or infinite values (sample {sample}, call {call}): "
                         "it overflows its dtype; export it in bfloat16 or float32 (recipe key dtype)")


def _holding(outputs: list[np.ndarray | None], scores: np.ndarray) -> int | None:
    """The call whose output ends with exactly these score rows (a causal LM's forced run is its replayed call), so
    they are stored once."""
    for j, output in enumerate(outputs):
        if output is not None and output.shape[-1] == scores.shape[-1] and output.size >= scores.size:
            rows = output.reshape(-1, output.shape[-1])[-len(scores):]
            if np.array_equal(rows, scores):
                return j
    return None


def load_replay(entry_dir: Path, samples: list) -> list[tuple[list, Outcome]]:
    """What `program_results` gave, as stored."""
    from xportbuild.models.methods import Outcome

    with reading_entry(entry_dir), np.load(entry_dir / OUTPUTS_FILE, allow_pickle=False) as data:
        results = []
        for i, sample in enumerate(samples):
            outputs = [data[f"s{i}.c{j}.out"] if f"s{i}.c{j}.out" in data.files else None
                       for j in range(len(sample.calls))]
            tokens = data[f"s{i}.forced.tokens"].tolist()
            if f"s{i}.forced.in" in data.files:
                holder = outputs[int(data[f"s{i}.forced.in"])]
                scores = holder.reshape(-1, holder.shape[-1])[-len(tokens):]
            else:
                scores = data[f"s{i}.forced.scores"]
            results.append((outputs, Outcome(tokens, list(scores))))
        return results


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    from xportbuild.stages.program import program_inputs

    return replay_programs(list(program_inputs(inputs).values()), inputs["reference"], node.params["task"], out_dir)
