"""Stage functions, one module each; `run(node, inputs, out_dir, workspace) -> dict` adapts a node to its typed stage."""
