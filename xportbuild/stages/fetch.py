"""Fetch stage: weights and tokenizer into one normalized folder (safetensors + tokenizer files)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from xportbuild import preflight, sources
from xportbuild.facts import source_facts
from xportbuild.console import library_progress
from xportbuild.errors import SourceError
from xportbuild.cache import ENTRY_FILE, StatCache
from xportbuild.recipe.spec import SourceSpec

log = logging.getLogger(__name__)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Which source exactly the folder came from, for the provenance record in the .pte.
SOURCE_RECORD = "xportbuild-source.json"
# Names the fetch entry writes itself (and the cache its record): a model folder's file of that name is not copied.
RESERVED = frozenset({SOURCE_RECORD, ENTRY_FILE})


def fetch(source: SourceSpec, model_file: str, out_dir: Path, scratch_root: Path, stats: StatCache) -> dict:
    """Materialize the source as a save_pretrained folder in `out_dir`; returns a summary."""
    facts = source_facts(source, model_file, scratch_root)
    if problem := preflight.remote_code_problem(source, model_file, facts):
        raise SourceError(problem)
    if source.kind == "gguf":
        if problems := preflight.model_type_problems(source, model_file, facts, preflight.gguf_task()):
            raise SourceError(problems[0])
        _convert_gguf(facts.location, out_dir, model_file)
    else:
        _copy_folder(facts.files, out_dir)
    # Which source exactly (commit SHA or content digest), for the provenance record in the .pte.
    # Not its path as spelled: the same bytes reached another way are the same fetch.
    identity = {**dataclasses.asdict(dataclasses.replace(source, path="")),
                **sources.fingerprint(source, model_file, stats, scratch_root)}
    (out_dir / SOURCE_RECORD).write_text(json.dumps({"source": identity}))
    config = json.loads((out_dir / "config.json").read_text())
    return {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
            "files": sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())}


def _copy_folder(files: dict[str, Path], out_dir: Path) -> None:
    """The folder's top-level files (already checked: regular, inside it) and its sentence-transformers modules'
    configs, without pickles or reserved names."""
    wanted = module_configs(files)
    for name, file in files.items():
        if ("/" in name and name not in wanted) or file.suffix in _PICKLE_SUFFIXES:
            continue
        if name in RESERVED:
            log.warning("%s: not copied: xportbuild writes a file of that name itself", file)
            continue
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, out_dir / name)


def module_configs(files: dict[str, Path]) -> set[str]:
    """The config.json of each module folder sentence-transformers' modules.json names (1_Pooling/config.json):
    how an embedding model pools and normalises its token states."""
    if "modules.json" not in files:
        return set()
    try:
        modules = json.loads(files["modules.json"].read_text())
        paths = {module["path"] for module in modules if module.get("path")}
    except (ValueError, TypeError, KeyError) as err:
        raise SourceError(f"{files['modules.json']}: not sentence-transformers' list of modules ({err})") from err
    return {f"{path}/config.json" for path in paths} & set(files)


def _convert_gguf(path: Path, out_dir: Path, model_file: str) -> None:
    """Dequantize a GGUF to float32 safetensors and convert its tokenizer, once per GGUF content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xportbuild.models.common import checkpoint_problem

    log.info("converting GGUF %s (dequantizing weights, converting the tokenizer)", path)
    try:
        with library_progress():  # transformers' own bar over the tensors it dequantizes
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model, loading = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32, output_loading_info=True)
    except (ValueError, KeyError, OSError) as err:
        raise SourceError(f"{model_file}: source: cannot load GGUF {path}: {err}") from err
    if problem := checkpoint_problem(loading):
        raise SourceError(f"{model_file}: source: {path} {problem}")
    _drop_gguf_quantizer(model, path)
    # Loading options would otherwise be saved into tokenizer_config.json, making the output (and every
    # key downstream) depend on HF_HUB_OFFLINE rather than on the GGUF's content.
    tokenizer.init_kwargs.pop("local_files_only", None)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _drop_gguf_quantizer(model, path: Path) -> None:
    """transformers keeps its GGUF quantizer attached (blocking save_pretrained) even when it dequantized
    every weight; detach it once we have checked that all weights are plain float32 tensors."""
    import torch

    packed = [name for name, p in model.named_parameters() if type(p.data) is not torch.Tensor or p.dtype != torch.float32]
    if packed:
        raise SourceError(f"GGUF {path}: weights {packed[:3]} stayed packed; cannot convert to float32 safetensors")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    return fetch(sources.source_of(node), node.origin, out_dir, workspace.cache_dir / "sources", workspace.store.stats)
