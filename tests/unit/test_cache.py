"""cache: atomic commit, corrupt entries become misses, concurrent commits keep one entry."""

from __future__ import annotations

import json
import logging

import pytest

from xportbuild.cache import ENTRY_FILE, Store

KEY = "ab" + "0" * 30


def _commit(store: Store, payload: bytes = b"program bytes") -> None:
    with store.building(KEY) as scratch:
        (scratch / "forward.pt2").write_bytes(payload)
        store.commit(KEY, scratch, {"stage": "program", "result": {"ok": True}})


def test_commit_then_lookup(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    entry = store.lookup(KEY)
    assert entry is not None and entry.file("forward.pt2").read_bytes() == b"program bytes"
    assert entry.result == {"ok": True}
    assert not list((tmp_path / "tmp").iterdir())


def test_failed_build_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    try:
        with store.building(KEY) as scratch:
            (scratch / "half.pt2").write_bytes(b"half")
            raise RuntimeError("stage crashed")
    except RuntimeError:
        pass
    assert store.lookup(KEY) is None
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("damaged, message", [(b"program", "truncated"), (b"PROGRAM BYTES", "content hash")],
                         ids=["truncated", "same-size-corruption"])
def test_damaged_file_is_a_miss_with_warning(tmp_path, caplog, damaged, message):
    store = Store(tmp_path)
    _commit(store)
    (store.entry_path(KEY) / "forward.pt2").write_bytes(damaged)
    with caplog.at_level(logging.WARNING):
        assert Store(tmp_path).lookup(KEY) is None
    assert message in caplog.text
    assert not store.entry_path(KEY).exists()


def test_unreadable_record_is_a_miss(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    (store.entry_path(KEY) / ENTRY_FILE).write_text("{not json")
    assert store.lookup(KEY) is None


def test_second_commit_of_same_key_keeps_first(tmp_path):
    store = Store(tmp_path)
    _commit(store, b"first")
    _commit(store, b"second")
    entry = store.lookup(KEY)
    assert entry.file("forward.pt2").read_bytes() == b"first"
    assert json.loads((entry.path / ENTRY_FILE).read_text())["key"] == KEY
