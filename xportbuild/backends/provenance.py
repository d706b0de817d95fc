"""Share a node's provenance records instead of copying them whole into every node made from it.

torch.fx records where each node came from (`meta["from_node"]`: a list of `NodeSource`, each holding the sources of
the node it names, back to the exported graph). A node made from another starts its record with a deep copy of the
other's whole chain, and every retrace of every pass makes new nodes from old ones, so the chains grow with each
pass and each one is copied again in full: a tenth of a tiny decoder's lowering. Nothing changes a record once it is
made (passes append new records to a node's own list, and ExecuTorch only reads chains, to number debug handles), so
within the block a new record holds the same earlier records, not copies of them. (The .pte does not hold these
records: with them dropped altogether, the bytes were the same. They are kept whole for what reads them, such as an
app's pass.)

Tied to the ExecuTorch version it was checked against (`backends.CHECKED_EXECUTORCH`);
tests/integration/test_lower_retrace.py lowers with and without it and compares the .pte bytes.
"""

from __future__ import annotations

from contextlib import contextmanager

from xportbuild.backends import executorch_is_checked


@contextmanager
def provenance_shared():
    """Within the block, a node's provenance record refers to the earlier records instead of copying them; yields
    how many records were made so."""
    from torch.fx.traceback import NodeSource

    counts = {"shared_records": 0}
    if not executorch_is_checked():
        yield counts
        return
    stock_init = NodeSource.__init__

    def init(self, node, pass_name: str = "", action=None) -> None:
        stock_init(self, None, pass_name, action)
        if node:
            counts["shared_records"] += 1
            self.node_info = NodeSource.NodeInfo(name=node.name, target=str(node.target), graph_id=id(node.graph))
            self.from_node = list(node.meta.get("from_node", ()))

    NodeSource.__init__ = init
    try:
        yield counts
    finally:
        NodeSource.__init__ = stock_init
