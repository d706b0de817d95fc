"""What every task kind shares: exportable methods, calling them (eager, program or .pte) the same way, and
recording the calls an app makes so that each method can be replayed and compared on its own.

A kind's module (causal_lm, masked_lm, image_classifier, seq2seq, multimodal) provides:
  load_model(model_dir) -> the float eager model;
  exportables(model, max_seq_len, export) -> {method: ExportableMethod} (`export`: the recipe's attention ops, read
    only by kinds with custom_attention);
  samples(model_dir, model, verify) -> the verification inputs, tokenized or generated, as {name: array};
  run(call, sample, facts, max_new_tokens, forced=None) -> Outcome: what an app gets, calling the methods in order;
    with `forced` (the float model's outcome), fed those tokens instead of its own choices: the scores each
    step gives on the float context, which is what the reference records and what every stage replays;
  metadata(model, model_dir, max_seq_len, export) -> constant methods written into the .pte.
Optional hooks: texts(model_dir, verify, outcomes) (the reference as text) and app_check(pte_path, model_dir,
prompt, pte_tokens, facts) (an app's own runtime on the published .pte).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xportbuild.cache import reading_entry
from xportbuild.errors import StageError
from xportbuild.models.export_shortcuts import unused_export_work_skipped

Call = Callable[[str, tuple], torch.Tensor]  # (method, positional tensors) -> its one output


@dataclass
class ExportableMethod:
    """A module exported as one method: example inputs, per input name its dynamic dims (or None), and what must
    hold while it is traced (e.g. a decoder's chunked scans at a fixed length)."""

    module: torch.nn.Module
    example: tuple
    dynamic_shapes: dict | None = None
    tracing: Callable[[], AbstractContextManager] = nullcontext


@dataclass
class Outcome:
    """What an app gets from a sample: generated tokens or predicted labels, with the scores each was chosen from
    (so a difference can be judged as a near-tie or not)."""

    tokens: list[int]
    scores: list[np.ndarray] = field(default_factory=list)


def token_sequence_method(module: torch.nn.Module, max_seq_len: int) -> ExportableMethod:
    """`module.forward(input_ids, attention_mask)` over one sequence of 2 to max_seq_len tokens (an encoder's)."""
    seq_len = torch.export.Dim("seq_len", min=2, max=max_seq_len)
    example = torch.tensor([[1, 2, 3]], dtype=torch.long)
    return ExportableMethod(module.eval(), (example, torch.ones_like(example)),
                            {"input_ids": {1: seq_len}, "attention_mask": {1: seq_len}})


def export_method(model_name: str, method: str, exportable: ExportableMethod) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad(), unused_export_work_skipped(), exportable.tracing():
            # Strict (TorchDynamo): ExecuTorch 1.4.1 cannot decompose what non-strict export makes of these
            # modules ("expected compiled_fn to be GraphModule" in lower), though non-strict would export faster.
            program = torch.export.export(exportable.module, exportable.example,
                                          dynamic_shapes=exportable.dynamic_shapes, strict=True)
    except Exception as err:  # torch.export raises many unrelated types; the user needs model, method and reason
        raise StageError(f"{model_name}: method {method} is not exportable: {_export_problem(err)}"
                         f"{_model_line(err)} ({type(err).__name__}: {_reason(err)})") from err
    _check_dynamic(model_name, method, exportable, program)
    return program


def _check_dynamic(model_name: str, method: str, exportable: ExportableMethod, program) -> None:
    """A dim declared dynamic that the program fixed to its example's size (a guard torch.export turned into a
    specialisation instead of an error) would make a program that runs at one length only."""
    inputs = [node for node in program.graph.nodes if node.op == "placeholder"][-len(exportable.example):]
    names = list(inspect.signature(exportable.module.forward).parameters)
    for name, node in zip(names, inputs):
        for dim in (exportable.dynamic_shapes or {}).get(name) or {}:
            if _fixed(node.meta["val"].shape[dim], program):
                guards = "; ".join(getattr(program, "_guards_code", None) or [])
                raise StageError(f"{model_name}: method {method} is not exportable: the model's code fixes input "
                                 f"{name} dim {dim} to its example size {node.meta['val'].shape[dim]}, and the method "
                                 f"must take any length (torch.export's guards: {guards or 'none recorded'})")


def _fixed(size, program) -> bool:
    """A size that is a number, or a symbol whose range holds one value."""
    expression = getattr(getattr(size, "node", None), "expr", None)
    if expression is None or not expression.free_symbols:
        return True
    bounds = program.range_constraints.get(expression)
    return bounds is not None and bounds.lower == bounds.upper


# What kind of code torch.export could not trace, by the error's type and text.
_EXPORT_PROBLEMS = (
    (("PendingUnbackedSymbol", "DataDependent", "data-dependent", "data dependent", "unbacked"),
     "a shape or branch that depends on a tensor's values"),
    (("Constraints violated", "guard", "Guard"), "a shape guard on the dynamic sequence length"),
    (("Unsupported", "skip", "does not know how to trace"), "a function or construct Dynamo does not trace"),
)


def _export_problem(err: BaseException) -> str:
    text = f"{type(err).__name__} {err}"
    return next((problem for needles, problem in _EXPORT_PROBLEMS if any(n in text for n in needles)),
                "code torch.export cannot trace")


def _reason(err: BaseException) -> str:
    """torch's own first line, or for a violated dynamic range the guard the model's code made (its range)."""
    lines = [line.strip() for line in str(err).strip().splitlines()]
    guard = next((line for line in lines if line.startswith("- Not all values of")), None)
    if guard:
        return re.sub(r"L\['(\w+)'\]", r"\1", guard.removeprefix("- "))[:300]
    return lines[0][:200] if lines and lines[0] else type(err).__name__


def _model_line(err: BaseException) -> str:
    """` at <file>:<line>: <code>`: the innermost frame of the model's own code that torch.export was tracing."""
    frames = [frame for frame in getattr(err, "real_stack", None) or ()
              if "/torch/" not in frame.filename and "/transformers/utils/" not in frame.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {Path(frame.filename).name}:{frame.lineno}: {(frame.line or '').strip()}"


def modules_called(model: torch.nn.Module, exportable: ExportableMethod) -> set[str]:
    """Names of `model`'s modules that run when the method runs on its example: the ones its program holds."""
    names = {id(module): name for name, module in model.named_modules()}
    called: set[str] = set()
    hooks = [module.register_forward_hook(lambda module, args, output: called.add(names[id(module)]))
             for module in model.modules()]
    try:
        with torch.no_grad():
            exportable.module(*exportable.example)
    finally:
        for hook in hooks:
            hook.remove()
    return called


def module_call(modules: dict[str, torch.nn.Module]) -> Call:
    def call(method: str, args: tuple) -> torch.Tensor:
        with torch.no_grad():
            return modules[method](*args)

    return call


def program_call(programs: dict[str, torch.export.ExportedProgram]) -> Call:
    return module_call({method: program.module() for method, program in programs.items()})


class Recorder:
    """Calls through `call`, keeping every (method, inputs, output) in order."""

    def __init__(self, call: Call):
        self.inner, self.calls = call, []

    def __call__(self, method: str, args: tuple) -> torch.Tensor:
        output = self.inner(method, args)
        self.calls.append((method, [np.asarray(a) for a in args], as_array(output)))
        return output


def greedy_token(logits: torch.Tensor, outcome: Outcome) -> int:
    """Pick the top token of the last position and remember the scores it was picked from."""
    scores = logits[0, -1].float().numpy()
    outcome.scores.append(scores)
    token = int(scores.argmax())
    outcome.tokens.append(token)
    return token


def follow(logits: torch.Tensor, outcome: Outcome, forced: list[int]) -> int:
    """Note what the last position would pick, and go on with the forced token of this step instead."""
    greedy_token(logits, outcome)
    return forced[len(outcome.tokens) - 1]


class Memo:
    """Calls through `call`, answering a call made again with the same inputs from memory: a kind's forced run
    repeats the calls just replayed (a causal LM's is one and the same call), so it costs nothing more."""

    def __init__(self, call: Call):
        self.inner, self.outputs = call, {}

    def __call__(self, method: str, args: tuple) -> torch.Tensor:
        key = (method, *((tuple(a.shape), str(a.dtype), a.numpy().tobytes()) for a in args))
        if key not in self.outputs:
            self.outputs[key] = self.inner(method, args)
        return self.outputs[key]


# Reference storage: one .npz (no pickle) plus a JSON index of the calls; logit outputs in the kind's
# `reference_logits` dtype.
SAMPLES_FILE, CALLS_FILE = "samples.npz", "calls.json"


@dataclass
class RecordedSample:
    inputs: dict[str, np.ndarray]
    outcome: Outcome  # the float model's tokens or labels (its scores are in the calls)
    calls: list[tuple[str, list[np.ndarray], np.ndarray]]

    @property
    def methods(self) -> list[str]:
        return [method for method, _, _ in self.calls]

    @property
    def outputs(self) -> list[np.ndarray]:
        return [output for _, _, output in self.calls]


def stored(calls: list[tuple[str, list[np.ndarray], np.ndarray]], logit_methods: tuple[str, ...], dtype: str) -> list:
    """The calls as the reference keeps them: logit outputs in `dtype`."""
    return [(method, args, output.astype(dtype) if method in logit_methods else output) for method, args, output in calls]


def save_samples(samples: list[RecordedSample], out_dir: Path) -> None:
    """An argument an app passes again unchanged (an encoder-decoder's cross-attention keys and values, at every
    decoder call) is stored once per sample; the index names where its copies come from."""
    import xxhash

    arrays, index = {}, []
    for i, sample in enumerate(samples):
        for name, value in sample.inputs.items():
            arrays[f"s{i}.input.{name}"] = value
        arrays[f"s{i}.tokens"] = np.array(sample.outcome.tokens, dtype=np.int64)
        first_of, same = {}, {}
        for j, (_, args, output) in enumerate(sample.calls):
            for k, arg in enumerate(args):
                content = (arg.shape, str(arg.dtype), xxhash.xxh3_128_hexdigest(np.ascontiguousarray(arg).tobytes()))
                if content in first_of:
                    same[f"c{j}.a{k}"] = first_of[content]
                else:
                    first_of[content] = f"c{j}.a{k}"
                    arrays[f"s{i}.c{j}.a{k}"] = arg
            arrays[f"s{i}.c{j}.out"] = output
        index.append({"inputs": sorted(sample.inputs), "same": same,
                      "calls": [[method, len(args)] for method, args, _ in sample.calls]})
    np.savez(out_dir / SAMPLES_FILE, **arrays)
    (out_dir / CALLS_FILE).write_text(json.dumps(index))


class NpzWriter:
    """Writes arrays into an .npz one at a time, as `np.savez` lays them out (same bytes for the same arrays in the
    same order), so a stage need not hold all of them in memory until the end."""

    def __init__(self, path: Path):
        import zipfile

        self._zip = zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, value: np.ndarray) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()


def load_samples(entry_dir: Path) -> list[RecordedSample]:
    with reading_entry(entry_dir):
        return _load_samples(entry_dir)


def _load_samples(entry_dir: Path) -> list[RecordedSample]:
    index = json.loads((entry_dir / CALLS_FILE).read_text())
    samples = []
    with np.load(entry_dir / SAMPLES_FILE, allow_pickle=False) as data:
        for i, item in enumerate(index):
            outcome = Outcome(data[f"s{i}.tokens"].tolist())
            same = item.get("same", {})
            read: dict[str, np.ndarray] = {}

            def argument(name: str) -> np.ndarray:
                name = same.get(name, name)
                if name not in read:
                    read[name] = data[f"s{i}.{name}"]
                return read[name]

            calls = [(method, [argument(f"c{j}.a{k}") for k in range(count)], data[f"s{i}.c{j}.out"])
                     for j, (method, count) in enumerate(item["calls"])]
            samples.append(RecordedSample({name: data[f"s{i}.input.{name}"] for name in item["inputs"]}, outcome, calls))
    return samples


def as_tensors(arrays: list[np.ndarray]) -> tuple:
    return tuple(torch.from_numpy(np.array(a)) for a in arrays)


def sequence_call(call: Call, runner_metadata: dict) -> Call:
    """`call` taking a decoder's whole sequence per call (a prompt's prefill, as recorded): itself, or for a program
    of one token per call (`enable_dynamic_shape` false), one call per token, the logits joined along the sequence."""
    if runner_metadata.get("enable_dynamic_shape", True):
        return call

    def token_by_token(method: str, args: tuple) -> torch.Tensor:
        tokens, positions = args
        return torch.cat([call(method, (tokens[:, i:i + 1], positions[i:i + 1])) for i in range(tokens.shape[1])], dim=1)

    return token_by_token


def replay(call: Call, sample: RecordedSample, methods: set[str]) -> list[np.ndarray | None]:
    """Each recorded call of `methods` made again through `call`, in the recorded order (a decoder's cache sees the
    same sequence of positions); None for calls of other methods."""
    return [as_array(call(method, as_tensors(args))) if method in methods else None for method, args, _ in sample.calls]


def as_array(output: torch.Tensor) -> np.ndarray:
    return output.float().numpy() if output.is_floating_point() else output.numpy()
