"""Model files for tiny test models: one function writes a model TOML for a given source."""

from __future__ import annotations

# Random tiny weights are far more sensitive to quantization than trained ones: relax the float comparison of the
# shipped quantized recipes (their comparison with the program stays as shipped).
QUANT_TOLERANCES = """
[tolerances.{recipe}]
min_cosine = 0.8
min_top1 = 0.5
max_abs = 100.0
max_kl = 10.0
"""

# A lowering pass (module app_passes, attr scale_logits) that scales the logits by 1.5 before returning them: a
# plausible-looking, wrong rewrite that verification must catch.
SCALE_LOGITS = (
    "import torch\n\n"
    "def scale_logits(program):\n"
    "    graph = program.graph\n"
    "    output = next(n for n in graph.nodes if n.op == 'output')\n"
    "    logits = output.args[0][-1]\n"
    "    with graph.inserting_before(output):\n"
    "        scaled = graph.call_function(torch.ops.aten.mul.Scalar, (logits, 1.5))\n"
    "    scaled.meta = dict(logits.meta)\n"
    "    output.args = ((*output.args[0][:-1], scaled),)\n"
    "    program.graph_module.recompile()\n"
    "    return program\n")


def model_toml(source: str, recipes: list[str], prompts: tuple[str, ...] = ("the capital of france is", "hello world"),
               max_seq_len: int = 32, max_new_tokens: int = 6) -> str:
    """A model file; `source` is the body of its [source] table."""
    quoted = ", ".join(f'"{r}"' for r in recipes)
    prompt_list = ", ".join(f'"{p}"' for p in prompts)
    overrides = "".join(QUANT_TOLERANCES.format(recipe=r) for r in recipes if r.startswith("xnnpack-8da8w-shared"))
    return (f'doc = "tiny test model"\ntask = "causal-lm"\nmax_seq_len = {max_seq_len}\nrecipes = [{quoted}]\n\n'
            f"[source]\n{source}\n\n[verify]\nprompts = [{prompt_list}]\nmax_new_tokens = {max_new_tokens}\n"
            f"{overrides}")


def local(path) -> str:
    return f'kind = "local"\npath = "{path}"'
