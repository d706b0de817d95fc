"""Loading a fetched model with the Auto class of its kind, honouring the source's remote-code opt-in."""

from __future__ import annotations

import json
from pathlib import Path

from xportbuild.errors import StageError


def load_pretrained(auto_class, model_dir: Path, what: str):
    """The float32 eager model from a fetched folder; remote code runs only if its source opted in."""
    import torch

    from xportbuild.stages.fetch import SOURCE_RECORD

    trust_remote_code = json.loads((model_dir / SOURCE_RECORD).read_text())["trust_remote_code"] is True
    try:
        model = auto_class.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                           use_safetensors=True)
    except ValueError as err:
        raise StageError(f"cannot load {model_dir} as a {what}: {err}") from err
    return model.eval()


def text_limit(model, max_seq_len: int, limit_name: str = "max_position_embeddings") -> None:
    limit = getattr(model.config.get_text_config(), limit_name, None)
    if limit is not None and max_seq_len > limit:
        raise StageError(f"max_seq_len = {max_seq_len} exceeds the model's {limit_name} ({limit}): "
                         "lower max_seq_len in the model file")
