"""The lowering shortcuts must not change a single byte of the program: skipping XNNPACK's no-op pass retraces
(backends/retrace.py) and the decompositions that have nothing to do (backends/decompose.py)."""

from __future__ import annotations

from tests.integration.models import local, model_toml


def _lower_module_bytes(module, example, patched: bool) -> tuple[bytes, dict]:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from xportbuild.backends.decompose import fewer_decompositions
    from xportbuild.backends.retrace import skip_unchanged_retraces

    program = torch.export.export(module, example)
    if not patched:
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer, {}
    with skip_unchanged_retraces() as retraces, fewer_decompositions() as decompositions:
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer, {**retraces, **decompositions}


def _rewritten_by_many_passes():
    """Conv + batch norm (fused), ReLU (fused activation), concatenation (decomposed), channels-last reshapes,
    linear (converted): a graph where several passes do rewrite and the others find nothing."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.norm = torch.nn.BatchNorm2d(8)
            self.linear = torch.nn.Linear(16, 4)

        def forward(self, image):
            features = torch.relu(self.norm(self.conv(image)))
            pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)
            return self.linear(pooled)

    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 3, 12, 12),)


def test_skipping_no_op_retraces_keeps_a_conv_net_byte_identical():
    module, example = _rewritten_by_many_passes()
    stock, _ = _lower_module_bytes(module, example, patched=False)
    fast, counts = _lower_module_bytes(module, example, patched=True)
    assert counts["skipped"] > 0 and counts["run"] > 0 and counts["deferred"] == 1, counts
    assert fast == stock


def _refused_by_the_partitioner():
    """A linear whose weight is computed at run time (XNNPACK keeps only linears with constant weights): the
    partitioner refuses it, so the last decomposition has work to do and must run."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x, weight):
            return torch.nn.functional.linear(self.linear(x), weight * 2.0)

    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 8), torch.randn(4, 8))


def test_the_last_decomposition_runs_when_the_partitioner_refused_an_op():
    module, example = _refused_by_the_partitioner()
    stock, _ = _lower_module_bytes(module, example, patched=False)
    fast, counts = _lower_module_bytes(module, example, patched=True)
    assert counts["deferred"] == 1 and counts["run"] == 2, counts
    assert fast == stock


def test_the_lower_stage_output_is_byte_identical_without_the_patch(project, weights, tmp_path, monkeypatch):
    """The real lower stage on a quantized decoder with the shared table and custom ops, patched and not."""
    from xportbuild import backends
    from xportbuild.recipe.spec import LowerSpec
    from xportbuild.stages.lower import lower

    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["xnnpack-8da8w-shared"]))
    project.doit("quantize:tiny-gemma3-xnnpack-8da8w-shared")
    program = project.entry("quantize:tiny-gemma3-xnnpack-8da8w-shared").path
    spec = LowerSpec(backend="xnnpack", extract_delegate_segments=True, passes=(), per_op_mode=False)

    def lowered(folder: str) -> tuple[bytes, bytes, dict]:
        out = tmp_path / folder
        out.mkdir()
        facts = lower([program], spec, {}, out, True, {}, ("update_cache", "custom_sdpa"))
        return (out / "model.pte").read_bytes(), (out / "model.ptd").read_bytes(), \
            {**facts["xnnpack_pass_retraces"], **{f"decompositions {name}": count
                                                  for name, count in facts["decompositions"].items()}}

    *fast, counts = lowered("patched")
    assert counts["skipped"] > 0 and counts["decompositions skipped"] == 1, counts
    monkeypatch.setattr(backends, "CHECKED_EXECUTORCH", "another version")
    *stock, stock_counts = lowered("stock")
    assert set(stock_counts.values()) == {0}, stock_counts
    assert fast == stock
