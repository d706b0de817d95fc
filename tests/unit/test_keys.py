"""keys: canonical encoding, pinned digest, stat-cached file hashing."""

from __future__ import annotations

import os

import pytest

from xportbuild import keys


def test_pinned_digest_changes_only_deliberately():
    # If this fails, key construction changed: every cache entry is invalidated. Bump keys.SCHEMA too.
    assert keys.digest_value({"b": [1, 2.5, "x"], "a": None}) == "eae3dd25faeaa96d4f79c0db7f766610"


def test_canonical_json_ignores_key_order():
    assert keys.canonical_json({"a": 1, "b": {"d": 2, "c": 3}}) == keys.canonical_json({"b": {"c": 3, "d": 2}, "a": 1})


def test_nan_cannot_enter_a_key():
    with pytest.raises(ValueError, match="non-finite"):
        keys.digest_value({"tol": float("nan")})


def test_library_versions_do_not_import_libraries():
    import sys

    versions = keys.library_versions(("xxhash", "surely-not-installed-pkg"))
    assert versions["surely-not-installed-pkg"] == "absent"
    assert "surely-not-installed-pkg" not in sys.modules
