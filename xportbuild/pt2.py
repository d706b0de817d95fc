"""Deterministic .pt2 archives: the same ExportedProgram always serializes to the same bytes.

torch.export.save writes values that differ on every run: each zip's `.data/serialization_id` (random), every
node's provenance `graph_id` and target repr and the keys of its `nn_module_stack` (addresses). Same
key must mean same bytes, or a rebuilt program never reuses the lowering cached from an identical one, so all are
made functions of the content.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import xxhash

_SERIALIZATION_ID = ".data/serialization_id"
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_MODULE_ADDRESS = re.compile(r"(\d+)(@\d+)?$")
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... crc32 at field 6, name and extra lengths last
_CENTRAL_CRC_OFFSET = 16  # crc32 in a central directory record
_LOCAL_CRC_OFFSET = 14
_DEFERRED_CRC = 0x08  # general purpose flag bit 3: CRC and sizes follow the data
_DESCRIPTOR_MAGIC = b"PK\x07\x08"


def number_addresses(program) -> None:
    """Replace every address in node metadata (provenance graph ids, module-stack keys) by the order in which
    its graph or module is first seen: the same identities, without the process's memory layout."""
    from torch.fx.traceback import NodeSource

    graphs: dict[int, int] = {}
    modules: dict[str, str] = {}

    def renumber(source: NodeSource) -> None:
        if source.node_info is not None:
            source.node_info.graph_id = graphs.setdefault(source.node_info.graph_id, len(graphs))
            source.node_info.target = _ADDRESS.sub("", source.node_info.target)  # "<function f at 0x7f…>"
        source._dict = None  # its cached dict holds the old id
        for parent in source.from_node:
            renumber(parent)

    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            for source in node.meta.get("from_node", ()):
                renumber(source)
            if stack := node.meta.get("nn_module_stack"):
                node.meta["nn_module_stack"] = {_module_key(key, modules): value for key, value in stack.items()}


def _module_key(key: str, modules: dict[str, str]) -> str:
    """`140523554991376@1` (a module's address, then its call) -> `m3@1`; other keys are kept."""
    address = _MODULE_ADDRESS.match(key)
    if address is None:
        return key
    return modules.setdefault(address[1], f"m{len(modules)}") + (address[2] or "")


class _DeferredErrors(io.RawIOBase):
    """A file that torch's C++ zip writer can write through: that writer throws from a destructor when a write
    fails, which aborts the whole process (a full disk would be a core dump, not a message). Here a failed write
    is kept, and raised once the writer is done."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:  # torch rewinds the file it was given when it is done
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.handle.write(data)
            except OSError as err:
                self.error = err
        return len(data)


def save(program, path: Path) -> None:
    """torch.export.save, then every serialization id set from the archive's content."""
    import torch

    number_addresses(program)
    with open(path, "wb") as handle:
        writer = _DeferredErrors(handle)
        torch.export.save(program, writer)
        if writer.error is not None:
            raise writer.error
    with open(path, "r+b") as archive:
        _fix_ids(archive)


def load(path: Path):
    """torch.export.load, with the type hints of each serialization schema class looked up once.

    The deserializer asks `typing.get_type_hints` for the class of every object it rebuilds (about ten thousand
    times for a small decoder, 40 % of the load); a class's hints do not change while it loads."""
    import torch

    with _schema_type_hints_once():
        return torch.export.load(path)


@contextmanager
def _schema_type_hints_once():
    import typing

    from torch._export.serde import schema

    original = typing.get_type_hints
    schema_names = vars(schema)
    known: dict = {}

    def get_type_hints(obj, globalns=None, localns=None, include_extras=False):
        if globalns is not schema_names or localns is not None or include_extras or not isinstance(obj, type):
            return original(obj, globalns, localns, include_extras)
        if obj not in known:
            known[obj] = original(obj, globalns)
        return dict(known[obj])

    typing.get_type_hints = get_type_hints
    try:
        yield
    finally:
        typing.get_type_hints = original


def _members(archive) -> list[tuple[zipfile.ZipInfo, int]]:
    """(member, offset of its data) of the zip that is the whole of the open file `archive`."""
    archive.seek(0)
    infos = zipfile.ZipFile(archive).infolist()
    located = []
    for info in infos:
        archive.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(archive.read(_LOCAL_HEADER.size))
        located.append((info, info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]))
    return located


def _fix_ids(archive) -> bool:
    """Rewrite in place, at equal length, each serialization id of the zip `archive` and of the zips stored inside
    it (torch.save payloads); returns whether anything changed."""
    members = _members(archive)
    content = xxhash.xxh3_128()
    for info, _ in members:
        if not info.filename.endswith(_SERIALIZATION_ID):
            content.update(f"{info.filename}:{info.CRC}\n".encode())
    changed = False
    for info, data_at in members:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size < len(_ZIP_MAGIC):
            continue
        archive.seek(data_at)
        if info.filename.endswith(_SERIALIZATION_ID):
            digits = str(content.intdigest()).zfill(info.file_size)[-info.file_size:].encode()
            changed |= _rewrite(archive, info, data_at, digits)
        elif archive.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
            archive.seek(data_at)
            nested = io.BytesIO(archive.read(info.file_size))
            if _fix_ids(nested):
                changed |= _rewrite(archive, info, data_at, nested.getvalue())
    return changed


def _rewrite(archive, info: zipfile.ZipInfo, data_at: int, data: bytes) -> bool:
    """Put `data` (same length) as the member's bytes and its CRC-32 into both headers that record it."""
    archive.seek(data_at)
    if archive.read(len(data)) == data:
        return False
    crc = struct.pack("<L", zlib.crc32(data))
    archive.seek(data_at)
    archive.write(data)
    for at in _crc_places(archive, info, data_at):
        archive.seek(at)
        archive.write(crc)
    return True


def _crc_places(archive, info: zipfile.ZipInfo, data_at: int) -> list[int]:
    """Where the member's CRC-32 is recorded: the central directory, the local header unless it defers to a data
    descriptor (flag bit 3, as torch writes), and that descriptor (with or without its signature)."""
    places = [_central_record(archive, info) + _CENTRAL_CRC_OFFSET]
    if not info.flag_bits & _DEFERRED_CRC:
        return places + [info.header_offset + _LOCAL_CRC_OFFSET]
    archive.seek(data_at + info.compress_size)
    signed = archive.read(len(_DESCRIPTOR_MAGIC)) == _DESCRIPTOR_MAGIC
    archive.seek(info.header_offset + _LOCAL_CRC_OFFSET)
    local = [info.header_offset + _LOCAL_CRC_OFFSET] if archive.read(4) != b"\0\0\0\0" else []
    return places + local + [data_at + info.compress_size + (len(_DESCRIPTOR_MAGIC) if signed else 0)]


def _central_record(archive, info: zipfile.ZipInfo) -> int:
    """Offset of the member's central directory record."""
    archive.seek(0)
    with zipfile.ZipFile(archive) as reader:
        cursor = reader.start_dir
    while True:
        archive.seek(cursor)
        fixed = archive.read(46)
        name_length, extra_length, comment_length = struct.unpack("<3H", fixed[28:34])
        if archive.read(name_length).decode() == info.filename:
            return cursor
        cursor += 46 + name_length + extra_length + comment_length
