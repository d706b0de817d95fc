"""The lowering shortcuts must not change a single byte of the program: skipping XNNPACK's no-op pass retraces
(backends/retrace.py), the decompositions that have nothing to do (backends/decompose.py) and the pattern graphs no
partition could match (backends/patterns.py)."""

from __future__ import annotations

from tests.integration.models import local, model_toml


def _lower_module_bytes(module, example, patched: bool) -> tuple[bytes, dict]:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from xportbuild.backends.decompose import fewer_decompositions
    from xportbuild.backends.patterns import patterns_only_where_they_could_match
    from xportbuild.backends.retrace import skip_unchanged_retraces

    program = torch.export.export(module, example)
    if not patched:
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer, {}
    with skip_unchanged_retraces() as retraces, patterns_only_where_they_could_match() as patterns:
        with fewer_decompositions() as decompositions:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        buffer = edge.to_executorch().buffer
    return buffer, {**retraces, **decompositions, **_prefixed("patterns", patterns)}


def _prefixed(prefix: str, counts: dict) -> dict:
    return {f"{prefix} {name}": count for name, count in counts.items()}


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


def test_skipping_no_op_retraces_keeps_a_conv_net_byte_identical(monkeypatch):
    module, example = _rewritten_by_many_passes()
    stock, _ = _lower_module_bytes(module, example, patched=False)
    calls = _count_pattern_calls(monkeypatch)
    fast, counts = _lower_module_bytes(module, example, patched=True)
    assert counts["skipped"] > 0 and counts["run"] > 0 and counts["deferred"] == 1, counts
    assert counts["patterns skipped"] > 0 and counts["patterns searched"] == 0, counts
    assert calls == [], calls  # ExecuTorch's pattern functions were never asked: no pattern graph was built
    assert fast == stock


def _count_pattern_calls(monkeypatch) -> list[str]:
    """The names of ExecuTorch's pattern functions, each time one of them is called from now on."""
    import importlib

    from xportbuild.backends.patterns import PATTERN_PASSES

    calls = []

    def counted(function, name: str):
        def call():
            calls.append(name)
            return function()

        return call

    for spec in PATTERN_PASSES:
        module = importlib.import_module(spec.pattern_module)
        monkeypatch.setattr(module, spec.function, counted(getattr(module, spec.function), spec.function))
    return calls


def _matched_by_both_patterns():
    """Attention with a float mask (which XNNPACK's SDPA pattern recovers from its decomposition) and bilinear
    upsampling: partitions where both pattern passes search, and find."""
    import torch

    class Net(torch.nn.Module):
        def forward(self, q, k, v, mask, image):
            attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return attention, torch.nn.functional.interpolate(image, scale_factor=2, mode="bilinear")

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    return Net().eval(), (q, k, v, torch.zeros(8, 8), torch.randn(1, 3, 4, 4))


def test_pattern_passes_still_search_the_partitions_that_hold_their_ops():
    module, example = _matched_by_both_patterns()
    stock, _ = _lower_module_bytes(module, example, patched=False)
    fast, counts = _lower_module_bytes(module, example, patched=True)
    assert counts["patterns searched"] > 0, counts
    assert fast == stock


def test_every_pattern_holds_the_ops_that_gate_its_search():
    """The premise of backends/patterns.py, on the pattern graphs the installed ExecuTorch makes."""
    import importlib

    from xportbuild.backends.patterns import PATTERN_PASSES, edge_op

    for spec in PATTERN_PASSES:
        patterns = getattr(importlib.import_module(spec.pattern_module), spec.function)()
        assert len(patterns) > 0, spec
        for pattern in patterns:
            targets = {node.target for node in pattern.graph.nodes if node.op == "call_function"}
            assert {edge_op(name) for name in spec.ops} <= targets, (spec.pass_class, pattern.graph)


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
            {**facts["xnnpack_pass_retraces"], **_prefixed("decompositions", facts["decompositions"]),
             **_prefixed("patterns", facts["xnnpack_pattern_searches"])}

    *fast, counts = lowered("patched")
    assert counts["skipped"] > 0 and counts["decompositions skipped"] == 1 and counts["patterns skipped"] > 0, counts
    monkeypatch.setattr(backends, "CHECKED_EXECUTORCH", "another version")
    *stock, stock_counts = lowered("stock")
    assert set(stock_counts.values()) == {0}, stock_counts
    assert fast == stock
