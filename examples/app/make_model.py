"""Writes the app's tiny model (random weights, seed 0) next to its config and tokenizer: weights are built, not
kept in the repo.

    python make_model.py
"""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FOLDER = Path(__file__).parent / "models" / "tiny-llama"


def main() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FOLDER)).eval()
    with torch.no_grad():  # random tiny weights give near-uniform logits; a sharper head avoids greedy ties
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(FOLDER)


if __name__ == "__main__":
    main()
