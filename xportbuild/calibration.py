"""Calibrated rounding for the quantize stage: each linear's input second moments on a text file, and GPTQ.

GPTQ (Frantar et al., 2022) rounds a weight matrix one input column at a time and moves each column's rounding error
onto the columns not rounded yet, in proportion to how the layer's inputs correlate, so that the layer's outputs on
those inputs change least. Scales are symmetric and fixed first, in the delegate's scale type, so the codes GPTQ
picks are the codes stored.
"""

from __future__ import annotations

from pathlib import Path

from xportbuild.console import progress
from xportbuild.errors import StageError

# Columns updated together before the rest of the matrix sees their errors: a speed knob, not a numerical one.
_BLOCK = 128
# Fractions of a group's largest magnitude tried as its range: on Gemma 3 270M (8da4w, group 32) choosing among
# them cut the mean KL to float from 0.173 to 0.142 (README, "4-bit linears").
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def calibration_batches(model_dir: Path, text_file: Path, sequence_length: int) -> list:
    """The text file's tokens in rows of `sequence_length`, each starting with the tokenizer's BOS if it has one."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = sequence_length - len(bos)
    rows = [bos + ids[start:start + width] for start in range(0, len(ids) - width + 1, width)]
    if not rows:
        raise StageError(f"quantize.calibration: {text_file} holds {len(ids)} tokens, fewer than one row of "
                         f"{width} (max_seq_len): give it more text")
    return [torch.tensor([row]) for row in rows]


def input_moments(model, module_names: set[str], batches: list) -> dict:
    """{module name: X^T X / rows} of each named linear's inputs while the model reads `batches`."""
    import torch

    modules = dict(model.named_modules())
    sums, rows = {}, {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in sorted(module_names)]
    try:
        with torch.no_grad():
            for batch in progress(batches, desc="calibration", unit="batch"):
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    unseen = sorted(module_names - set(sums))
    if unseen:
        raise StageError(f"quantize.algorithm: the calibration text never reached {unseen[:3]}: they cannot be "
                         "calibrated")
    return {name: sums[name] / rows[name] for name in sums}


def gptq_round(weight, moments, bits: int, group_size: int, scale_dtype, damping: float):
    """(codes, scales) of `weight` [out, in] on a symmetric `bits`-bit grid, one scale per row and group of
    `group_size` inputs (0: the whole row). `scales` is [out, groups], exactly representable in `scale_dtype`.

    Columns are rounded in order of decreasing input energy (the diagonal of `moments`), so the columns that matter
    most are rounded while the most others remain to absorb their error. The scales are fixed before any column is
    rounded, each group's chosen among clipped min-max ranges for the least input-weighted rounding error."""
    import torch

    weight = weight.detach().float().clone()
    columns = weight.shape[1]
    group = group_size or columns
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    moments = moments.clone()
    dead = torch.diag(moments) == 0
    moments[dead, dead] = 1
    weight[:, dead] = 0
    energy = torch.diag(moments)
    scales = _clipped_scales(weight, energy, group, low, high, scale_dtype)
    order = torch.argsort(energy, descending=True, stable=True)
    weight, column_scales = weight[:, order], scales[:, order // group]
    upper_inverse = _upper_inverse_cholesky(moments[order][:, order], damping)
    codes = torch.zeros_like(weight, dtype=torch.int8)
    for start in range(0, columns, _BLOCK):
        end = min(start + _BLOCK, columns)
        block, errors = weight[:, start:end], torch.zeros(weight.shape[0], end - start)
        inverse = upper_inverse[start:end, start:end]
        for offset in range(end - start):
            scale = column_scales[:, start + offset]
            code = torch.clamp(torch.round(block[:, offset] / scale), low, high)
            codes[:, start + offset] = code.to(torch.int8)
            error = (block[:, offset] - code * scale) / inverse[offset, offset]
            block[:, offset:] -= error[:, None] * inverse[offset, offset:][None, :]
            errors[:, offset] = error
        weight[:, end:] -= errors @ upper_inverse[start:end, end:]
    in_place = torch.empty_like(codes)
    in_place[:, order] = codes
    return in_place, scales


def _clipped_scales(weight, energy, group: int, low: int, high: int, scale_dtype):
    """Per row and group, the symmetric scale (as the round-to-nearest path computes it, in the delegate's scale
    type) of the clipped range among _CLIPS whose rounding error, weighted by each input's energy, is least."""
    import torch

    groups = weight.reshape(weight.shape[0], -1, group)
    weights = energy.reshape(1, -1, group)
    largest = groups.abs().amax(dim=-1)
    best_scale, best_error = None, None
    for clip in _CLIPS:
        scale = torch.clamp(clip * largest / ((high - low) / 2), min=torch.finfo(torch.float32).eps)
        scale = scale.to(scale_dtype).float()
        rounded = torch.clamp(torch.round(groups / scale[..., None]), low, high) * scale[..., None]
        error = ((groups - rounded).square() * weights).sum(dim=-1)
        better = error < best_error if best_error is not None else torch.ones_like(error, dtype=torch.bool)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        best_error = error if best_error is None else torch.where(better, error, best_error)
    return best_scale


def _upper_inverse_cholesky(moments, damping: float):
    """Upper Cholesky factor of the damped inverse of `moments`."""
    import torch

    moments = moments + damping * torch.mean(torch.diag(moments)) * torch.eye(moments.shape[0])
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(moments))
        return torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError as err:  # torch.linalg.LinAlgError: not positive definite even after damping
        raise StageError(f"quantize.damping = {damping}: the calibration inputs' moments stay singular ({err}); "
                         "raise damping or give more calibration text") from err
