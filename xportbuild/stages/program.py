"""Program stage: torch.export of every method of the float model -> one .pt2 per method."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

METHODS_FILE = "methods.json"


def save_programs(programs: dict, out_dir: Path) -> dict:
    """Write each ExportedProgram as <method>.pt2 plus methods.json; returns per-method facts."""
    import torch

    facts = {}
    for method, program in programs.items():
        path = out_dir / f"{method}.pt2"
        torch.export.save(program, path)
        ops = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
        quant_ops = sum(count for name, count in ops.items() if "quantize" in name or "choose_qparams" in name)
        facts[method] = {"file": path.name, "bytes": path.stat().st_size, "ops": sum(ops.values()),
                         "quant_ops": quant_ops}
    (out_dir / METHODS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True))
    return facts


def load_programs(entry_dir: Path) -> dict:
    """{method: ExportedProgram} from a program or quantize entry."""
    import torch
    import torchao  # noqa: F401  registers the quantized tensor types a .pt2 may hold

    facts = json.loads((entry_dir / METHODS_FILE).read_text())
    return {method: torch.export.load(entry_dir / fact["file"]) for method, fact in facts.items()}


def export_program(model_dir: Path, max_seq_len: int, out_dir: Path, prepare=None) -> dict:
    """Load the float model, let `prepare` transform it (e.g. quantize), export every method."""
    from xportbuild.models import causal_lm

    model = causal_lm.load_model(model_dir)
    prepared = prepare(model) if prepare is not None else {}
    programs = causal_lm.export_methods(causal_lm.exportable(model, max_seq_len), max_seq_len)
    missing = set(causal_lm.METHODS) - set(programs)
    if missing:
        raise RuntimeError(f"export produced no program for methods {sorted(missing)}")
    return {"methods": save_programs(programs, out_dir), **prepared}


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    return export_program(inputs["fetch"], node.params["max_seq_len"], out_dir)
