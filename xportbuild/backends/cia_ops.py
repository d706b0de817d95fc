"""torch asks its C++ dispatcher for every operator with an implicit decomposition, about 160 times per lowering.

Each `run_decompositions`, and each default decomposition table ExecuTorch builds, collects the operators it may
preserve (`torch._export.utils._collect_all_valid_cia_ops`): for each of about forty operator namespaces it first
lists every CompositeImplicitAutograd registration of the dispatcher and looks each one up under `torch.ops`, so that
they exist as Python objects (`_materialize_cpp_cia_ops`). Looking up what is already there changes nothing: within
the block, the lookups run again only when the dispatcher holds registrations they have not seen (a library loaded
in between registers new operators). About a twentieth of a tiny model's lowering.

Tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`, which pairs with torch 2.13.0),
as the other lowering shortcuts are; tests/integration/test_lower_retrace.py lowers with and without it and compares
the .pte bytes.
"""

from __future__ import annotations

from contextlib import contextmanager

from xportbuild.backends import executorch_is_checked

_KEY = "CompositeImplicitAutograd"


@contextmanager
def cia_ops_materialized_once():
    """Within the block, the dispatcher's implicit-decomposition operators are looked up once per set of
    registrations; yields how many lookups were skipped and run."""
    import torch
    import torch._export.utils as export_utils

    counts = {"skipped": 0, "run": 0}
    if not executorch_is_checked():
        yield counts
        return
    stock = export_utils._materialize_cpp_cia_ops
    materialized: set[str] = set()

    def materialize() -> None:
        registrations = torch._C._dispatch_get_registrations_for_dispatch_key(_KEY)
        if materialized.issuperset(registrations):
            counts["skipped"] += 1
            return
        counts["run"] += 1
        stock()
        materialized.update(registrations)

    export_utils._materialize_cpp_cia_ops = materialize
    try:
        yield counts
    finally:
        export_utils._materialize_cpp_cia_ops = stock
