"""cache: atomic commit, corrupt entries become misses, concurrent commits keep one entry, remote pulls
are hash-checked, and nothing in a record can point outside its entry."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from xportbuild.cache import ENTRY_FILE, Store
from xportbuild.keys import digest_value
from xportbuild.remote import RemoteCache

KEY_DOC = {"stage": "program", "params": {"max_seq_len": 32}}
KEY = digest_value(KEY_DOC)


def _commit(store: Store, payload: bytes = b"program bytes") -> None:
    with store.building(KEY) as scratch:
        (scratch / "forward.pt2").write_bytes(payload)
        store.commit(KEY, scratch, {"stage": "program", "key_doc": KEY_DOC, "result": {"ok": True}})


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


def test_entry_recorded_under_another_key_is_a_miss(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    other = digest_value({"stage": "program", "params": {"max_seq_len": 64}})
    store.entry_path(other).parent.mkdir(parents=True, exist_ok=True)
    os.rename(store.entry_path(KEY), store.entry_path(other))
    assert store.lookup(other) is None


def test_scratch_of_a_killed_process_is_pruned(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / "tmp" / f"{KEY[:12]}-{int(dead.stdout)}-x1"
    orphan.mkdir(parents=True)
    (orphan / "forward.pt2").write_bytes(b"half")
    _commit(store)
    assert not orphan.exists()
    assert store.lookup(KEY).file("forward.pt2").read_bytes() == b"program bytes"


def _remote(folder, notes) -> RemoteCache:
    return RemoteCache(str(folder), read_only=False, notes_dir=notes)


def _remote_with_entry(tmp_path):
    remote = Store(tmp_path / "remote")
    _commit(remote)
    return tmp_path / "remote"


def test_remote_entry_is_pulled_and_pushed(tmp_path):
    remote = _remote_with_entry(tmp_path)
    local = Store(tmp_path / "local", remote=_remote(remote, tmp_path / "notes"))
    entry = local.lookup(KEY)
    assert entry is not None and entry.path.is_relative_to(tmp_path / "local")
    assert entry.file("forward.pt2").read_bytes() == b"program bytes"
    fresh_remote = Store(tmp_path / "local", remote=_remote(tmp_path / "remote2", tmp_path / "notes"))
    fresh_remote.push(entry)
    assert Store(tmp_path / "other", remote=_remote(tmp_path / "remote2", tmp_path / "n2")).lookup(KEY) is not None


@pytest.mark.parametrize("tamper", ["same-size", "record-key", "escaping-name"])
def test_tampered_remote_entry_is_rejected(tmp_path, caplog, tamper):
    remote = _remote_with_entry(tmp_path)
    remote_entry = Store(remote).entry_path(KEY)
    record = json.loads((remote_entry / ENTRY_FILE).read_text())
    if tamper == "same-size":
        (remote_entry / "forward.pt2").write_bytes(b"PROGRAM BYTES")
    elif tamper == "record-key":
        record["key_doc"] = {"stage": "program", "params": {"max_seq_len": 99}}
    else:
        (tmp_path / "outside").write_bytes(b"secret")
        record["files"] = {"../../../../../outside": {"size": 6, "digest": "x"}}
    (remote_entry / ENTRY_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        assert Store(tmp_path / "local", remote=_remote(remote, tmp_path / "notes")).lookup(KEY) is None
    assert "rejected" in caplog.text
    assert not Store(tmp_path / "local").entry_path(KEY).exists()


def test_stat_cache_reads_unchanged_files_once(tmp_path, monkeypatch):
    from xportbuild import cache

    big = tmp_path / "weights.bin"
    big.write_bytes(b"x" * 1000)
    stats = cache.StatCache(tmp_path / "stat")
    reads = []
    real_hash = cache.hash_file
    monkeypatch.setattr(cache, "hash_file", lambda path: reads.append(path) or real_hash(path))
    first = stats.digest(big)
    assert stats.digest(big) == first and len(reads) == 1
    os.utime(big, ns=(1, 1))  # touched, same content: one re-read, then cached again
    assert stats.digest(big) == first and len(reads) == 2
    assert stats.digest(big) == first and len(reads) == 2
    big.write_bytes(b"y" * 1000)
    assert stats.digest(big) != first


def _flip_in_place(path, offset: int = 0) -> None:
    """Change one byte without changing size or mtime, as bit rot does."""
    stamp = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_a_stamp_hides_bit_rot_but_check_and_rehashing_do_not(tmp_path):
    from xportbuild.errors import CacheCorrupt

    store = Store(tmp_path)
    _commit(store)
    entry = store.lookup(KEY)
    _flip_in_place(entry.file("forward.pt2"))
    assert store.lookup(KEY) is not None, "the no-op path trusts unchanged stamps"
    with pytest.raises(CacheCorrupt, match="forward.pt2 does not match its content hash"):
        store.check(entry)
    assert store.stats.rehashing().digest(entry.file("forward.pt2")) != entry.record["files"]["forward.pt2"]["digest"]


def test_fsck_discards_damaged_entries_and_keeps_intact_ones(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    other_doc = {**KEY_DOC, "params": {"max_seq_len": 64}}
    other = digest_value(other_doc)
    with store.building(other) as scratch:
        (scratch / "forward.pt2").write_bytes(b"other program")
        store.commit(other, scratch, {"stage": "program", "key_doc": other_doc, "result": {}})
    _flip_in_place(store.entry_path(KEY) / "forward.pt2", offset=3)
    checked, findings = Store(tmp_path).fsck()
    assert checked == 2
    assert len(findings) == 1 and KEY in findings[0] and "does not match its content hash" in findings[0]
    assert not store.entry_path(KEY).exists() and store.lookup(other) is not None
    assert Store(tmp_path).fsck() == (1, [])


def test_a_read_only_remote_is_pulled_from_and_never_written(tmp_path):
    remote = _remote_with_entry(tmp_path)
    reader = Store(tmp_path / "local", remote=RemoteCache(str(remote), read_only=True, notes_dir=tmp_path / "notes"))
    entry = reader.lookup(KEY)
    assert entry is not None
    elsewhere = tmp_path / "remote2"
    Store(tmp_path / "local", remote=RemoteCache(str(elsewhere), read_only=True, notes_dir=tmp_path / "notes")).push(entry)
    assert not elsewhere.exists()


def test_a_remote_that_cannot_be_written_warns_once_and_a_later_build_pushes_what_it_missed(tmp_path, caplog):
    local = Store(tmp_path / "local")
    _commit(local)
    other_key = digest_value({**KEY_DOC, "params": {"max_seq_len": 64}})
    with local.building(other_key) as scratch:
        (scratch / "forward.pt2").write_bytes(b"other program")
        local.commit(other_key, scratch, {"stage": "program", "key_doc": {**KEY_DOC, "params": {"max_seq_len": 64}},
                                          "result": {}})
    unwritable = RemoteCache("/sys/xportbuild-remote", read_only=False, notes_dir=tmp_path / "notes")
    down = Store(tmp_path / "local", remote=unwritable)
    with caplog.at_level(logging.WARNING):
        for key in (KEY, other_key):
            down.push(local.lookup(key))
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1 and len(caplog.records) == 1
    assert "could not push" in caplog.text and "a later build pushes what is missing" in caplog.text
    assert unwritable.pending() == sorted([KEY, other_key])

    back = RemoteCache(str(tmp_path / "remote"), read_only=False, notes_dir=tmp_path / "notes")
    Store(tmp_path / "local", remote=back).push_pending()
    assert back.pending() == []
    for key in (KEY, other_key):
        assert Store(tmp_path / "fresh", remote=_remote(tmp_path / "remote", tmp_path / "n3")).lookup(key) is not None


def test_concurrent_pushes_of_one_key_leave_one_whole_entry(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    local = Store(tmp_path / "local")
    _commit(local, payload=b"program bytes" * 100_000)
    entry = local.lookup(KEY)
    pushers = [RemoteCache(str(tmp_path / "remote"), read_only=False, notes_dir=tmp_path / f"notes{i}") for i in range(8)]
    # Started together, pushers that find the key missing write every file and the record over each other.
    with ThreadPoolExecutor(len(pushers)) as pool:
        list(pool.map(lambda remote: remote.push(KEY, entry.path, entry.record), pushers))
    pulled = Store(tmp_path / "fresh", remote=_remote(tmp_path / "remote", tmp_path / "n")).lookup(KEY)
    assert pulled is not None and pulled.file("forward.pt2").read_bytes() == b"program bytes" * 100_000
    assert not list((tmp_path / "remote" / "incoming").iterdir())


def test_a_record_changed_after_it_was_written_is_a_miss(tmp_path, caplog):
    """The verification numbers live in the record's result, which no file hash covers: the record's own digest
    does, so editing them (files untouched) discards the entry."""
    store = Store(tmp_path)
    _commit(store)
    record_file = store.entry_path(KEY) / ENTRY_FILE
    record = json.loads(record_file.read_text())
    record["result"] = {"ok": True, "top1": 1.0}
    record_file.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        assert Store(tmp_path).lookup(KEY) is None
    assert "its record was changed after it was written" in caplog.text


@pytest.mark.parametrize("record", [[1, 2], {"files": {"a": 3}}, {"files": {"forward.pt2": {"size": "1", "digest": 2}}}],
                         ids=["a-list", "files-not-records", "wrong-types"])
def test_a_record_of_another_shape_is_a_miss_not_a_crash(tmp_path, caplog, record):
    store = Store(tmp_path)
    _commit(store)
    (store.entry_path(KEY) / ENTRY_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        assert Store(tmp_path).lookup(KEY) is None
    assert "cache entry" in caplog.text


def test_an_entry_folder_without_its_record_is_discarded_so_the_key_can_be_built_again(tmp_path, caplog):
    store = Store(tmp_path)
    _commit(store)
    (store.entry_path(KEY) / ENTRY_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        assert store.lookup(KEY) is None
    assert "has no record" in caplog.text and not store.entry_path(KEY).exists()
    _commit(store, b"rebuilt")  # would fail with "Directory not empty" if the folder were left
    assert store.lookup(KEY).file("forward.pt2").read_bytes() == b"rebuilt"


def test_a_stage_cannot_write_the_records_name(tmp_path):
    from xportbuild.errors import StageError

    store = Store(tmp_path)
    with pytest.raises(StageError, match="the name of the cache's own record"):
        with store.building(KEY) as scratch:
            (scratch / ENTRY_FILE).write_text("{}")
            store.commit(KEY, scratch, {"stage": "program", "key_doc": KEY_DOC, "result": {}})


def test_a_string_that_is_not_a_key_names_no_entry(tmp_path):
    from xportbuild.errors import CacheCorrupt

    store = Store(tmp_path)
    _commit(store)
    for bad in ("", "../../x", "ab"):
        with pytest.raises(CacheCorrupt):
            store.entry_path(bad)
    assert store.lookup(KEY) is not None


def test_signed_records_are_pulled_unsigned_or_forged_ones_are_not(tmp_path):
    """A store's key signs what is pushed; a record another wrote (digest recomputed, signature not) is refused."""
    remote_dir = tmp_path / "remote"
    built = Store(tmp_path / "a", remote=RemoteCache(str(remote_dir), False, tmp_path / "notes-a", b"secret"))
    _commit(built)
    built.push(built.lookup(KEY))
    keyed = Store(tmp_path / "b", remote=RemoteCache(str(remote_dir), False, tmp_path / "notes-b", b"secret"))
    assert keyed.lookup(KEY) is not None

    from xportbuild.keys import record_digest

    record_file = next(remote_dir.rglob(ENTRY_FILE))
    record = json.loads(record_file.read_text())
    record["result"] = {"ok": "forged"}
    record["record_digest"] = record_digest(record)
    record_file.write_text(json.dumps(record))
    assert Store(tmp_path / "c", remote=RemoteCache(str(remote_dir), False, tmp_path / "notes-c", b"secret")).lookup(KEY) is None
    assert Store(tmp_path / "d", remote=RemoteCache(str(remote_dir), False, tmp_path / "notes-d", b"other")).lookup(KEY) is None
