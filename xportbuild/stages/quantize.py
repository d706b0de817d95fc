"""Quantize stage: torchao quantization of the eager model's linears and embeddings, then export per method.

Every knob must take effect: the stage reads back what it quantized and fails if anything differs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from xportbuild.console import progress
from xportbuild.errors import StageError
from xportbuild.models.kinds import kind_of
from xportbuild.recipe.spec import QuantSpec
from xportbuild.stages.program import EAGER_QUALITY_FILE, KL_BY_POSITION, MethodExport, export_part, load_model, method_export

log = logging.getLogger(__name__)

WEIGHT_BITS = {"4w": 4, "8w": 8, "8da4w": 4, "8da8w": 8}


@dataclass(frozen=True)
class Rounding:
    """How weights meet their grid: by nearest with `qparams` scales, except the modules in `moments` (their inputs'
    second moments on the calibration text), which GPTQ rounds with `damping`."""

    qparams: str = "affine"
    moments: dict = field(default_factory=dict)
    damping: float = 0.01


@dataclass(frozen=True)
class CalibrationText:
    """The text GPTQ measures a model's inputs on, cut by the model's tokenizer into rows of `sequence_length`."""

    model_dir: Path
    text_file: Path
    sequence_length: int


def rounding_for(model, spec: QuantSpec, plan: "Plan", text: CalibrationText | None) -> Rounding:
    """The recipe's rounding; for GPTQ, the planned linears' input moments on the calibration text (not the head
    that shares its 8-bit table with the embedding: the two must keep one set of codes)."""
    if spec.algorithm == "none":
        return Rounding(spec.qparams)
    from xportbuild.calibration import calibration_batches, input_moments

    if text is None:
        raise StageError(f"quantize.algorithm = {spec.algorithm!r} needs its calibration text")
    shared_head = spec.tied_table == "shared" and _tied(model)
    names = {name for name, (part, _, _) in plan.items() if part == "linear" or (part == "head" and not shared_head)}
    batches = calibration_batches(text.model_dir, text.text_file, text.sequence_length)
    return Rounding(spec.qparams, input_moments(model, names, batches), spec.damping)


def _config(scheme: str, group_size: int, group_scale_dtype: str, qparams: str | None):
    """torchao's config for a scheme; `qparams` None: the caller gives the scales (GPTQ)."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    granularity = PerAxis(0) if group_size == 0 else PerGroup(group_size)
    weight_dtype = torch.int4 if WEIGHT_BITS[scheme] == 4 else torch.int8
    scale_dtype = getattr(torch, group_scale_dtype) if group_size else None
    algorithm = {"hqq": IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY, "affine": IntxChooseQParamsAlgorithm.AFFINE,
                 None: None}[qparams]
    if scheme.startswith("8da"):
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity,
                                                     weight_scale_dtype=scale_dtype,
                                                     intx_choose_qparams_algorithm=algorithm)
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity, scale_dtype=scale_dtype,
                                intx_choose_qparams_algorithm=algorithm)


def module_parts(model) -> dict[str, dict[str, int]]:
    """{part: {module name: input width}} for the parts a recipe quantizes separately."""
    import torch

    head = _output_embeddings(model)
    vocab_size = _vocab_size(model)
    parts: dict[str, dict[str, int]] = {"embedding": {}, "head": {}, "linear": {}}
    for name, module in model.named_modules():
        # Token tables only: position and token-type tables are small, and some models (Whisper's encoder) add
        # their weight directly, which a quantized tensor does not support.
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == vocab_size:
            parts["embedding"][name] = module.weight.shape[-1]
        elif isinstance(module, torch.nn.Linear):
            parts["head" if module is head else "linear"][name] = module.weight.shape[-1]
    return parts


def _plan_groups(widths: dict[str, int], group_size: int, fallback: bool, what: str) -> dict[str, int]:
    if group_size == 0:
        return {name: 0 for name in widths}
    undivided = sorted(name for name, width in widths.items() if width % group_size)
    if undivided and len(undivided) == len(widths):
        raise StageError(f"quantize.{what}_group_size={group_size} divides no {what} layer (widths: "
                         f"{sorted(set(widths.values()))}); pick a divisor or 0 for per-channel")
    if undivided and not fallback:
        raise StageError(f"quantize.{what}_group_size={group_size} does not divide {undivided[:3]}...; "
                         "set per_axis_fallback = true or pick another group size")
    return {name: (0 if name in undivided else group_size) for name in widths}


Plan = dict[str, tuple[str, str, int]]  # module name -> (part, scheme, group size)


def requested_parts(spec: QuantSpec) -> list[tuple[str, str, int]]:
    """(part, scheme, group size) of every part the recipe quantizes."""
    parts = (("embedding", spec.embedding, spec.embedding_group_size), ("head", spec.head_scheme, spec.head_groups),
             ("linear", spec.linear, spec.linear_group_size))
    return [part for part in parts if part[1] != "none"]


def quantization_plan(model, spec: QuantSpec, used: set[str] | None = None) -> Plan:
    """What the recipe asks for each module; raises if a requested part is absent or cannot be grouped.

    `used`: the modules one method runs. Only they are quantized, and a part the method does not have (a vision
    encoder has no token table) is left out of its plan: the quantize stage reports it as absent."""
    whole = module_parts(model)
    parts = whole if used is None else {part: {name: width for name, width in names.items() if name in used}
                                        for part, names in whole.items()}
    plan: Plan = {}
    for part, scheme, group_size in requested_parts(spec):
        if not whole[part] and part == "linear":
            raise StageError(f"quantize.{part} = {scheme!r} but the model has no {part} layers")
        if not parts[part]:
            continue  # a model without a token table or output projection, or another method's part: reported absent
        for name, size in _plan_groups(parts[part], group_size, spec.per_axis_fallback, part).items():
            plan[name] = (part, scheme, size)
    return plan


def apply_plan(model, plan: Plan, group_scale_dtype: str, rounding: Rounding) -> dict:
    """Quantize in place as planned; returns per part the scheme and layer counts read back from the weights."""
    from torchao.quantization import quantize_

    tied = _tied(model)
    for part, scheme, group_size in sorted(set(plan.values())):
        names = {name for name, planned in plan.items() if planned == (part, scheme, group_size)}
        # Group scales in the delegate's storage type apply to linears only: embeddings run on ExecuTorch's
        # own quantized kernels, which read float32 scales.
        scale_dtype = "float32" if part == "embedding" else group_scale_dtype
        nearest = names - set(rounding.moments)
        config = _config(scheme, group_size, scale_dtype, rounding.qparams)
        quantize_(model, config, filter_fn=lambda module, fqn, names=nearest: fqn in names)
        for name in progress(sorted(names & set(rounding.moments)), desc=f"GPTQ {part}s", unit="linear"):
            _gptq_quantize(model.get_submodule(name), rounding.moments[name], rounding.damping, scheme, group_size,
                           scale_dtype)
    report = _read_back(model, plan)
    if rounding.moments:
        report["rounding"] = {"algorithm": "gptq", "layers": len(set(plan) & set(rounding.moments)),
                              "damping": rounding.damping}
    if tied:
        # The output head reuses the embedding table in float; quantized, each keeps its own copy.
        report["tied_embedding"] = {"tied_in_float": True, "quantized_copies": 2 if _tied_parts_quantized(plan) else 1}
    return report


def _gptq_quantize(module, moments, damping: float, scheme: str, group_size: int, scale_dtype: str) -> None:
    """Quantize one linear with the codes and scales GPTQ chose, in the same torchao tensor the nearest path makes."""
    import torch
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    from xportbuild.calibration import gptq_round

    config = _config(scheme, group_size, scale_dtype, None)
    codes, scales = gptq_round(module.weight, moments, WEIGHT_BITS[scheme], group_size, getattr(torch, scale_dtype),
                               damping)
    group = group_size or codes.shape[1]
    # The dequantized weights lie on the grid exactly: torchao's own quantize_affine of them gives back `codes`.
    module.weight = torch.nn.Parameter(codes.float() * scales.repeat_interleave(group, dim=1), requires_grad=False)
    _QUANTIZE_CONFIG_HANDLER[type(config)](module, config, custom_scale=scales,
                                           custom_zero_point=torch.zeros_like(scales, dtype=torch.int8))


def _output_embeddings(model):
    """The output head, or None for models that have none (image classifiers, encoders)."""
    try:
        return model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def _vocab_size(model) -> int | None:
    """Rows of the token embedding table."""
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return getattr(embedding, "num_embeddings", None)


def _tied(model) -> bool:
    head = _output_embeddings(model)
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return False
    return head is not None and embedding is not None and getattr(head, "weight", None) is getattr(embedding, "weight", 0)


def _tied_parts_quantized(plan: Plan) -> bool:
    return any(part == "head" for part, _, _ in plan.values()) and any(part == "embedding" for part, _, _ in plan.values())


def _read_back(model, plan: Plan) -> dict:
    """Check each module's weight is quantized with the planned block size; count per part and group size."""
    modules = dict(model.named_modules())
    report: dict[str, dict] = {}
    for name, (part, scheme, group_size) in plan.items():
        weight = modules[name].weight
        block = getattr(weight, "block_size", None)
        expected = group_size or weight.shape[-1]
        if block is None or block[-1] != expected:
            raise StageError(f"quantize: {part} {name} was not quantized as planned "
                             f"(weight {type(weight).__name__}, block {block}, expected group {expected})")
        entry = report.setdefault(part, {"scheme": scheme, "layers": Counter()})
        entry["layers"]["per-channel" if group_size == 0 else f"group {group_size}"] += 1
    return {part: {**entry, "layers": dict(entry["layers"])} for part, entry in report.items()}


def quantize_model(model, spec: QuantSpec, group_scale_dtype: str = "float32", used: set[str] | None = None,
                   text: CalibrationText | None = None) -> dict:
    """Quantize in place as the recipe says (only the `used` modules, if given; GPTQ measures inputs on `text`);
    returns what was quantized, read back from the weights."""
    tied_in_float = _tied(model)
    plan = quantization_plan(model, spec, used)
    report = apply_plan(model, plan, group_scale_dtype, rounding_for(model, spec, plan, text))
    if used is not None:
        planned = {part for part, _, _ in plan.values()}
        report["absent_parts"] = [part for part, _, _ in requested_parts(spec) if part not in planned]
    if spec.tied_table == "shared":
        shared = _check_shared_table(model, tied_in_float)
        report["tied_embedding"] = {**shared, "quantized_copies": 1} if shared["shared_table"] else shared
    return report


def _check_shared_table(model, tied_in_float: bool) -> dict:
    """The lower stage stores one table for the embedding and the head only if their 8-bit codes are identical."""
    import torch

    if not tied_in_float:
        log.warning("quantize.tied_table = \"shared\" does nothing for this model: its output head does not reuse "
                    "its embedding table (tie_word_embeddings is false)")
        return {"tied_in_float": False, "shared_table": None}
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    codes = [getattr(weight, "qdata", None) for weight in (head, embedding)]
    if any(code is None for code in codes) or not torch.equal(codes[0], codes[1]):
        raise StageError("quantize.tied_table = \"shared\": the quantized head and embedding differ, so they "
                         "cannot share one table (check that both use the same qparams and per-channel scales)")
    return {"tied_in_float": True, "shared_table": list(codes[0].shape)}


def eager_quality(model, part: MethodExport, samples: list) -> dict:
    """The eager `model`'s method replayed on the reference's recorded calls, against the float outputs there."""
    return eager_measure(model, part, samples)[0]


def eager_measure(model, part: MethodExport, samples: list) -> tuple[dict, list[list[float]]]:
    """`eager_quality`, and the KL from the float outputs at every position of every sample."""
    from xportbuild.models.methods import module_call, replay
    from xportbuild.quality import method_quality, one_thread, position_kl, sample_quality

    kind = kind_of(part.task)
    # A wrapper of its own, with the model's stock attention ops: running it fills a decoder's cache buffers,
    # and the export that follows builds fresh ones.
    exportable = kind.wrapper().exportables(model, part.max_seq_len)[part.method]
    call = module_call({part.method: exportable.module})
    with one_thread():
        outputs = [replay(call, sample, {part.method}) for sample in samples]
    numbers = method_quality([sample_quality(output, sample.outputs, sample.methods, kind.logit_methods)
                              for output, sample in zip(outputs, samples)])
    return numbers, [position_kl(output, sample.outputs, sample.methods, kind.logit_methods)
                     for output, sample in zip(outputs, samples)]


def quantize(model_dir: Path, reference_dir: Path, part: MethodExport, spec: QuantSpec, group_scale_dtype: str,
             out_dir: Path) -> dict:
    """Quantize the float model as the recipe says for this method (only the modules the method runs), measure the
    quantized eager method on the reference's recorded calls, export it."""
    from xportbuild.models.methods import load_samples, modules_called

    kind = kind_of(part.task)
    model = load_model(model_dir, part)
    used = modules_called(model, kind.wrapper().exportables(model, part.max_seq_len)[part.method])
    report = quantize_model(model, spec, group_scale_dtype, used, calibration_text(model_dir, spec, part))
    numbers, kl_by_position = eager_measure(model, part, load_samples(reference_dir))
    (out_dir / EAGER_QUALITY_FILE).write_text(json.dumps({**numbers, KL_BY_POSITION: kl_by_position}, indent=1))
    return {**export_part(model, model_dir, part, out_dir), "quantized": report, "eager_quality": numbers}


def calibration_text(model_dir: Path, spec: QuantSpec, part: MethodExport) -> CalibrationText | None:
    return CalibrationText(model_dir, Path(spec.calibration), part.max_seq_len) if spec.algorithm != "none" else None


def quant_spec(node) -> QuantSpec:
    """The node's quantization; its key holds the calibration text's digest, its locator the file."""
    return QuantSpec(**{**node.params["quantize"], "calibration": node.locator.get("calibration", "")})


def run(node, inputs: dict[str, Path], out_dir: Path, workspace) -> dict:
    return quantize(inputs["fetch"], inputs["reference"], method_export(node), quant_spec(node),
                    node.params["group_scale_dtype"], out_dir)
