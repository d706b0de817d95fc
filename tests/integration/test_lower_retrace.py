"""The lowering shortcuts must not change a single byte of the program: skipping XNNPACK's no-op pass retraces
(backends/retrace.py), the decompositions that have nothing to do (backends/decompose.py), the pattern graphs no
partition could match (backends/patterns.py), the fake values a retrace computes again (backends/fake_values.py),
the code of graph modules nothing runs (backends/lazy_code.py) and the copies of provenance records
(backends/provenance.py), all entered as the lower stage enters them (backends/shortcuts.py)."""

from __future__ import annotations

from tests.integration.models import local, model_toml


def _lower_module_bytes(module, example, patched: bool) -> tuple[bytes, dict]:
    import torch

    return _lower_programs_bytes(torch.export.export(module, example), patched)


def _lower_programs_bytes(programs, patched: bool, backend: str = "xnnpack") -> tuple[bytes, dict]:
    from executorch.exir import to_edge_transform_and_lower

    from xportbuild.backends import partitioners
    from xportbuild.backends.shortcuts import LoweringShortcuts
    from xportbuild.recipe.spec import LowerSpec

    if not patched:
        return to_edge_transform_and_lower(programs, partitioner=partitioners(LowerSpec(backend))).to_executorch().buffer, {}
    shortcuts = LoweringShortcuts()
    with shortcuts.lowering(), shortcuts.executorch():
        with shortcuts.edge_conversion():
            edge = to_edge_transform_and_lower(programs, partitioner=partitioners(LowerSpec(backend)))
        buffer = edge.to_executorch().buffer
    return buffer, _flat(shortcuts.facts())


def _flat(facts: dict) -> dict:
    """The shortcuts' counts in one dict: the retrace and lazy-code counts by their own names, the others prefixed
    ("decompositions skipped", "patterns searched", "fake_values reused", "provenance shared_records", "cia_ops
    skipped")."""
    return {**facts["xnnpack_pass_retraces"], **facts["lazy_code"],
            **{f"{prefix} {name}": count for key, prefix in _PREFIXES.items() for name, count in facts[key].items()}}


_PREFIXES = {"decompositions": "decompositions", "xnnpack_pattern_searches": "patterns", "fake_values": "fake_values",
             "provenance": "provenance", "cia_ops": "cia_ops"}


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
    assert counts["skipped"] > 0 and counts["run"] > 0 and counts["decompositions skipped"] == 1, counts
    assert counts["patterns skipped"] > 0 and counts["patterns searched"] == 0, counts
    assert calls == [], calls  # ExecuTorch's pattern functions were never asked: no pattern graph was built
    assert counts["fake_values reused"] > 0 and counts["fake_values computed"] > 0, counts
    assert counts["lazy_modules"] > 0 and counts["provenance shared_records"] > 0, counts
    assert counts["cia_ops skipped"] > 0 and counts["cia_ops run"] > 0, counts
    assert fast == stock


def _two_methods_with_size_only_ops():
    """Two methods, each exported on its own (its own fake mode), each making a tensor from sizes alone
    (`arange`, `ones`): the same call in both methods must not share a value across fake modes."""
    import torch

    class Positions(torch.nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[-1], dtype=x.dtype)

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return x * torch.arange(x.shape[-1], dtype=x.dtype) + torch.ones(x.shape[-1])

    example = (torch.randn(2, 8),)
    return {"positions": torch.export.export(Positions(), example), "scaled": torch.export.export(Scaled(), example)}


def test_fake_values_are_reused_only_within_their_own_method():
    stock, _ = _lower_programs_bytes(_two_methods_with_size_only_ops(), patched=False)
    fast, counts = _lower_programs_bytes(_two_methods_with_size_only_ops(), patched=True)
    assert counts["fake_values reused"] > 0, counts
    assert fast == stock


def test_equal_calls_within_one_retrace_keep_values_of_their_own():
    """A graph may hold the same call twice; reuse must not make two nodes share one fake value."""
    import torch
    from executorch.exir.pass_base import ExportPass

    from xportbuild.backends.fake_values import reuse_fake_values

    class Twice(torch.nn.Module):
        def forward(self, x):
            return x.permute(1, 0) + x.permute(1, 0)

    graph_module = torch.export.export(Twice(), (torch.randn(3, 4),)).graph_module
    with reuse_fake_values() as counts:
        for _ in range(2):
            graph_module = ExportPass()(graph_module).graph_module
    permutes = [node for node in graph_module.graph.nodes if node.target == torch.ops.aten.permute.default]
    assert len(permutes) == 2 and permutes[0].meta["val"] is not permutes[1].meta["val"], permutes
    assert counts["reused"] >= 3, counts  # both permutes and the add, on the second retrace


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
    assert counts["decompositions skipped"] == 0 and counts["decompositions run"] == 3, counts
    assert fast == stock


def _lower_stage_twice(project, tmp_path, monkeypatch, model: str, recipe: str) -> tuple[list, list, dict]:
    """The real lower stage on `model` with `recipe`'s lowering, patched then stock: (files, files, counts)."""
    from xportbuild import backends
    from xportbuild.recipe.spec import LowerSpec
    from xportbuild.stages.lower import lower

    target = f"{model}-{recipe}"
    project.doit(f"replay:{target}")
    node = project.plan().nodes[f"lower:{target}"]
    programs = [project.entry(task).path for task in node.inputs.values() if task.startswith(("program:", "quantize:"))]
    spec = LowerSpec(**{**node.params["lower"], "passes": ()})

    def lowered(folder: str) -> tuple[list, dict]:
        out = tmp_path / folder
        out.mkdir()
        facts = lower(programs, spec, {}, out, node.params["shared_table"], {}, tuple(node.params["custom_ops"]))
        return [path.read_bytes() for path in sorted(out.iterdir())], _flat(facts)

    fast, counts = lowered("patched")
    monkeypatch.setattr(backends, "CHECKED_EXECUTORCH", "another version")
    stock, stock_counts = lowered("stock")
    assert set(stock_counts.values()) == {0}, stock_counts
    return fast, stock, counts


def test_the_lower_stage_output_is_byte_identical_without_the_patch(project, weights, tmp_path, monkeypatch):
    """The real lower stage on a quantized decoder with the shared table and custom ops, patched and not."""
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["xnnpack-8da8w-shared"]))
    fast, stock, counts = _lower_stage_twice(project, tmp_path, monkeypatch, "tiny-gemma3", "xnnpack-8da8w-shared")
    assert counts["skipped"] > 0 and counts["decompositions skipped"] == 1 and counts["patterns skipped"] > 0, counts
    assert counts["fake_values reused"] > 0 and counts["lazy_modules"] > 0, counts
    assert counts["provenance shared_records"] > 0 and counts["cia_ops skipped"] > 0, counts
    assert len(fast) == 3 and fast == stock  # delegates.json, .pte and .ptd


def test_the_lower_stage_without_a_partitioner_is_byte_identical(project, weights, tmp_path, monkeypatch):
    """The portable backend: no partitioner, so ExecuTorch decomposes with its default table. (Folding the
    functionalize-only decomposition into the next, once part of decompose.py, changed these bytes.)"""
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["portable-fp32"]))
    fast, stock, counts = _lower_stage_twice(project, tmp_path, monkeypatch, "tiny-llama", "portable-fp32")
    assert counts["fake_values reused"] > 0 and counts["lazy_modules"] > 0, counts
    assert counts["provenance shared_records"] > 0 and counts["cia_ops skipped"] > 0, counts
    assert len(fast) == 2 and fast == stock  # delegates.json (none) and .pte


def test_a_module_whose_code_is_generated_late_still_runs_and_shows_its_code():
    import torch

    from xportbuild.backends.lazy_code import code_generated_when_run

    def double_then_add_one(x):
        return x * 2 + 1

    with code_generated_when_run() as counts:
        traced = torch.fx.symbolic_trace(double_then_add_one)
        assert "_code" not in vars(traced)  # nothing generated yet
        traced.graph.call_function(torch.relu, (next(iter(traced.graph.nodes)),))  # an edit, then recompile
        traced.recompile()
        x = torch.randn(3)
        assert torch.equal(traced(x), x * 2 + 1)
        assert "def forward" in traced.code
    assert counts["lazy_modules"] == 1, counts
    assert not isinstance(torch.fx.symbolic_trace(double_then_add_one), torch.fx._lazy_graph_module._LazyGraphModule)
