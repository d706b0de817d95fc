"""The lowering shortcuts, entered where each was checked, with what each did (the lower stage's facts).

Around the whole lowering, an app's passes included: XNNPACK's unchanged-partition retraces skipped (retrace.py),
pattern graphs only where they could match (patterns.py), fake values reused (fake_values.py), provenance records
shared (provenance.py). Around ExecuTorch's own calls only, which they were checked against (an app's pass may call
run_decompositions({}) and use the functional program it returns, or read a module's code): graph-module code
generated when run (lazy_code.py) and, around the edge conversion, decompositions with nothing to do skipped
(decompose.py) and the dispatcher's implicit-decomposition operators looked up once (cia_ops.py). Each is tied to
`backends.CHECKED_EXECUTORCH`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from xportbuild.backends.cia_ops import cia_ops_materialized_once
from xportbuild.backends.decompose import fewer_decompositions
from xportbuild.backends.fake_values import reuse_fake_values
from xportbuild.backends.lazy_code import code_generated_when_run
from xportbuild.backends.patterns import patterns_only_where_they_could_match
from xportbuild.backends.provenance import provenance_shared
from xportbuild.backends.retrace import skip_unchanged_retraces

_AROUND_LOWERING = {"xnnpack_pass_retraces": skip_unchanged_retraces,
                    "xnnpack_pattern_searches": patterns_only_where_they_could_match,
                    "fake_values": reuse_fake_values, "provenance": provenance_shared}
_AROUND_EXECUTORCH = {"lazy_code": code_generated_when_run}
_AROUND_EDGE_CONVERSION = {"decompositions": fewer_decompositions, "cia_ops": cia_ops_materialized_once}


class LoweringShortcuts:
    """Three nested blocks: `lowering()` (passes and ExecuTorch), `executorch()` (to_edge_transform_and_lower and
    to_executorch) and `edge_conversion()` (to_edge_transform_and_lower); `facts()` says what each shortcut did."""

    def __init__(self) -> None:
        self._counts: dict[str, dict] = {}

    def lowering(self):
        return self._entered(_AROUND_LOWERING)

    def executorch(self):
        return self._entered(_AROUND_EXECUTORCH)

    def edge_conversion(self):
        return self._entered(_AROUND_EDGE_CONVERSION)

    def facts(self) -> dict[str, dict]:
        return {name: dict(counts) for name, counts in self._counts.items()}

    @contextmanager
    def _entered(self, shortcuts: dict):
        with ExitStack() as stack:
            for name, shortcut in shortcuts.items():
                self._counts[name] = stack.enter_context(shortcut())
            yield
