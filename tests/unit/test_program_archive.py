"""A .pt2 from a shared cache is untrusted: a payload that is not a plain tensor is refused before loading."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch

from xportbuild.errors import StageError
from xportbuild.stages.program import load_programs, refuse_unsafe_pickles


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x)


def _save_program(folder):
    program = torch.export.export(Tiny(), (torch.ones(1, 4),))
    torch.export.save(program, folder / "forward.pt2")
    (folder / "methods.json").write_text(json.dumps({"forward": {"file": "forward.pt2"}}))
    return folder / "forward.pt2"


def test_plain_program_loads(tmp_path):
    _save_program(tmp_path)
    assert set(load_programs(tmp_path)) == {"forward"}


def test_archive_with_code_in_a_pickle_is_refused_without_running_it(tmp_path):
    path = _save_program(tmp_path)
    marker = tmp_path / "payload-ran"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    sample = next(name for name in members if name.endswith("sample_inputs/model.pt"))
    members[sample] = pickle.dumps(_Payload(marker))
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(StageError, match="refusing to load"):
        refuse_unsafe_pickles(path)
    with pytest.raises(StageError):
        load_programs(tmp_path)
    assert not marker.exists()


def test_loading_with_type_hints_looked_up_once_is_the_same_program(tmp_path):
    """pt2.load (schema type hints asked once per class) against torch.export.load: saved again, the same bytes."""
    import typing

    from xportbuild import pt2

    class Dynamic(torch.nn.Module):
        def forward(self, x, positions):
            return torch.nn.functional.silu(x) * positions.unsqueeze(-1), x.shape[0] * 2

    batch = torch.export.Dim("batch", max=16)
    program = torch.export.export(Dynamic(), (torch.ones(3, 4), torch.ones(3)), dynamic_shapes=({0: batch}, {0: batch}))
    pt2.save(program, tmp_path / "original.pt2")
    pt2.save(torch.export.load(tmp_path / "original.pt2"), tmp_path / "stock.pt2")
    pt2.save(pt2.load(tmp_path / "original.pt2"), tmp_path / "fast.pt2")
    assert (tmp_path / "fast.pt2").read_bytes() == (tmp_path / "stock.pt2").read_bytes()
    assert typing.get_type_hints.__module__ == "typing"  # restored
