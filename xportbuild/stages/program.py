"""Program stage: torch.export of every method of the float model -> one .pt2 per method."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from xportbuild import pt2
from xportbuild.cache import reading_entry
from xportbuild.errors import StageError
from xportbuild.models.kinds import kind_of
from xportbuild.recipe.spec import ExportSpec
from xportbuild.stages.fetch import SOURCE_RECORD

METHODS_FILE = "methods.json"
# Runner metadata and the source's identity, for the lower stage to write into the .pte.
MODEL_FACTS_FILE = "model_facts.json"
TASK_METHOD = "get_task"
# Written by the quantize stage: the quantized eager model's quality, before export and lowering.
EAGER_QUALITY_FILE = "eager_quality.json"
KL_BY_POSITION = "kl_by_position"  # beside the numbers of a quantized or lowered stage: KL from float, per position


def save_programs(programs: dict, out_dir: Path) -> dict:
    """Write each ExportedProgram as <method>.pt2 plus methods.json; returns per-method facts."""
    facts = {}
    for method, program in programs.items():
        path = out_dir / f"{method}.pt2"
        pt2.save(program, path)
        ops = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
        quant_ops = sum(count for name, count in ops.items() if "quantize" in name or "choose_qparams" in name)
        facts[method] = {"file": path.name, "bytes": path.stat().st_size, "ops": sum(ops.values()),
                         "quant_ops": quant_ops,
                         "llama_ops": sum(count for name, count in ops.items() if name.startswith("llama."))}
    (out_dir / METHODS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True))
    return facts


def load_programs(entry_dir: Path) -> dict:
    """{method: ExportedProgram} from a program or quantize entry."""
    import torch
    import torchao  # noqa: F401  registers the quantized tensor types a .pt2 may hold

    with reading_entry(entry_dir):
        facts = json.loads((entry_dir / METHODS_FILE).read_text())
        if any(fact.get("llama_ops", 0) for fact in facts.values()):
            from xportbuild.models.custom_attention import import_llama_ops

            import_llama_ops()
        programs = {}
        for method, fact in facts.items():
            refuse_unsafe_pickles(entry_dir / fact["file"])
            programs[method] = pt2.load(entry_dir / fact["file"])
    return programs


def program_inputs(inputs: dict[str, Path]) -> dict[str, Path]:
    """A stage's program entries: "program" (one node for all methods) or "program.<method>" (one per method)."""
    return {name: folder for name, folder in inputs.items() if name == "program" or name.startswith("program.")}


def load_target_programs(folders: list[Path]) -> dict:
    """{method: ExportedProgram} over every program entry of a target."""
    return {method: program for folder in folders for method, program in load_programs(folder).items()}


def refuse_unsafe_pickles(path: Path) -> None:
    """torch.export.load unpickles some payloads with weights_only=False. A .pt2 may come from a shared cache, so
    every pickled payload in it must first load under the weights_only unpickler (tensors, allowlisted types)."""
    import pickle

    import torch
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    def check(archive: zipfile.ZipFile, member: str) -> None:
        try:
            torch.load(io.BytesIO(archive.read(member)), weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as err:
            raise StageError(f"{path}: refusing to load: {member} is not a plain tensor payload ({err})") from err

    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith((".pt", ".pkl")):
                check(archive, member)
            elif member.endswith(("_weights_config.json", "_constants_config.json")):
                folder = member.rsplit("/", 1)[0]
                for meta in json.loads(archive.read(member))["config"].values():
                    if meta["path_name"].startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
                        raise StageError(f"{path}: refusing to load: it holds a pickled object ({meta['path_name']})")
                    if meta.get("use_pickle"):
                        check(archive, f"{folder}/{meta['path_name']}")


@dataclass(frozen=True)
class MethodExport:
    """One method of a model, as a program or quantize node exports it."""

    model_name: str  # for messages
    task: str
    method: str
    max_seq_len: int
    export: ExportSpec


def load_model(model_dir: Path, part: MethodExport):
    return kind_of(part.task).wrapper().load_model(model_dir)


def export_part(model, model_dir: Path, part: MethodExport, out_dir: Path) -> dict:
    """Export one method of the (possibly quantized) eager model; write it with the model's facts."""
    from xportbuild.models.custom_attention import llama_op_counts, missing_ops
    from xportbuild.models.methods import export_method

    wrapper = kind_of(part.task).wrapper()
    model = in_dtype(model, part.export.dtype)
    # The task first: an app reading a bare .pte learns from it how to call it (xportbuild.app.load).
    metadata = {TASK_METHOD: part.task, **wrapper.metadata(model, model_dir, part.max_seq_len, part.export)}
    exportables = wrapper.exportables(model, part.max_seq_len, part.export)
    if part.method not in exportables:
        raise StageError(f"{part.model_name}: task {part.task!r} exports method {part.method}, but this model provides "
                         f"{', '.join(exportables)}: declare the task that matches the model")
    program = export_method(part.model_name, part.method, exportables[part.method])
    if missing := missing_ops(llama_op_counts(program), requested_ops(exportables[part.method], part.export)):
        raise StageError(f"export: {', '.join(missing)} requested by the recipe but absent from method {part.method}: "
                         f"this model's attention does not go through transformers' attention interface")
    source = json.loads((model_dir / SOURCE_RECORD).read_text()).get("source")
    (out_dir / MODEL_FACTS_FILE).write_text(json.dumps({"runner": metadata, "source": source}, indent=1))
    return {"methods": save_programs({part.method: program}, out_dir), "runner_metadata": metadata}


def in_dtype(model, dtype: str):
    """The model computing in `dtype` (weights and the caches it builds from them); float32 as loaded."""
    import torch

    return model if dtype == "float32" else model.to(getattr(torch, dtype))


def requested_ops(exportable, export: ExportSpec) -> tuple[str, ...]:
    """The recipe's custom attention ops, if the method has attention to give them: a decoder of state-space layers
    only holds no key/value cache."""
    holds_cache = any(name.rsplit(".", 1)[-1].startswith("key_cache_") and buffer.numel()
                      for name, buffer in exportable.module.named_buffers())
    return export.custom_ops if holds_cache else ()


def method_export(node) -> MethodExport:
    """What a program or quantize node exports; the model it belongs to named for messages."""
    return MethodExport(node.subject.removesuffix(f".{node.part}"), node.params["task"], node.part,
                        node.params["max_seq_len"], ExportSpec(**node.params["export"]))


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    part = method_export(node)
    return export_part(load_model(inputs["fetch"], part), inputs["fetch"], part, out_dir)
