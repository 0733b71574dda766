"""Random access into tar shards: an index of every sample's member offsets, built from the tar headers.

Why an index of our own (docs/DATA.md 2.3): the indexed loader reads sample i of a source directly, so
it needs, per sample, where each member's bytes lie. The index is built once per rank at start-up
from the 512-byte member headers only (the data blocks are skipped), so it costs a few microseconds
per member. Plain ustar/GNU headers are parsed here; a shard with any other header (pax extended
headers, GNU long names) is indexed with ``tarfile`` instead, which reads the same headers more slowly.

Damage is recorded, never trusted away (docs/DATA.md 2.2). A shard that cannot be indexed completely
(empty, truncated inside a member or before its end-of-archive blocks, a bad header checksum, a
member name used twice in one sample) keeps the samples before the damage and adds one **fault
slot** to the source's order: reading that slot always raises its reason (``empty_shard``,
``tar_error``), so the skip counts report the damage each time the order passes it, as the stream
loader reports a shard it cannot read. A sample whose last member was cut off is kept without that
member, so validation skips it as ``missing_field``.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlightning.contracts.shard_format import split_member
from dlightning.data.transforms import SampleError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

BLOCK = 512
"""Tar block size: every header and every member's padded data is a multiple of it."""
_REGULAR = (b"0", b"\0", b"7")
"""Type flags of regular files (``7``: contiguous file, read as a regular one)."""
_NEEDS_TARFILE = (b"x", b"g", b"L", b"K", b"S")
"""pax extended headers, GNU long names and sparse files: left to ``tarfile``."""


class _UseTarfile(Exception):
    """A header this parser does not handle; the shard is indexed with ``tarfile``."""


class _Damaged(Exception):
    """The shard is damaged at this point; ``reason`` is its skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


Member = tuple[str, int, int]
"""``(member name, offset of its data, size)``."""


@dataclass
class ShardScan:
    """The members of one shard in archive order, and the damage that ended the scan (None: clean)."""

    members: list[Member]
    fault: tuple[str, str] | None = None


def scan_shard(path: str | Path) -> ShardScan:
    """Read the member headers of a tar shard.

    Args:
        path: The shard file.

    Returns:
        The regular-file members before any damage, and the damage as ``(reason, detail)``.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as exn:
        return ShardScan([], ("missing_shard", repr(exn)))
    except OSError as exn:
        return ShardScan([], ("tar_error", repr(exn)))
    if size == 0:
        return ShardScan([], ("empty_shard", f"{path} is empty"))
    members: list[Member] = []
    try:
        _scan_headers(str(path), size, members)
    except _UseTarfile:
        return _scan_with_tarfile(str(path), size)
    except _Damaged as err:
        return ShardScan(members, (err.reason, f"{path}: {err}"))
    except OSError as exn:
        return ShardScan(members, ("tar_error", f"{path}: {exn!r}"))
    return ShardScan(members)


def _scan_headers(path: str, size: int, members: list[Member]) -> None:
    """Append every regular member of ``path`` to ``members``; raise at the first damage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset + BLOCK <= size:
            header = os.pread(fd, BLOCK, offset)
            if header.count(0) == BLOCK:
                return  # the end-of-archive blocks
            name, length, kind = _parse_header(header, offset)
            data = offset + BLOCK
            if data + length > size:
                raise _Damaged("tar_error", f"member {name!r} ends at byte {data + length} > file size {size}")
            if kind in _REGULAR:
                members.append((name, data, length))
            offset = data + -(-length // BLOCK) * BLOCK
        raise _Damaged("tar_error", f"no end-of-archive blocks after byte {offset} (the file was cut short)")
    finally:
        os.close(fd)


def _parse_header(header: bytes, offset: int) -> tuple[str, int, bytes]:
    """``(name, data size, type flag)`` of one ustar/GNU header."""
    try:
        stored = int(header[148:156].strip(b" \0") or b"0", 8)
    except ValueError as exn:
        raise _Damaged("tar_error", f"unreadable header checksum at byte {offset}") from exn
    # The checksum is the byte sum with the checksum field read as spaces (POSIX ustar); 256 = 8 spaces.
    if stored != sum(header[:148]) + 256 + sum(header[156:]):
        raise _Damaged("tar_error", f"bad header checksum at byte {offset}")
    kind = header[156:157]
    if kind in _NEEDS_TARFILE or header[124] & 0x80:  # base-256 sizes are GNU's large-file extension
        raise _UseTarfile
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: long names are split into prefix/name (GNU differs)
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    try:
        length = int(header[124:136].strip(b" \0") or b"0", 8)
        return name.decode("utf-8"), length, kind
    except (ValueError, UnicodeDecodeError) as exn:
        raise _Damaged("tar_error", f"unreadable header at byte {offset}") from exn


def _scan_with_tarfile(path: str, size: int) -> ShardScan:
    members: list[Member] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.offset_data + info.size > size:
                    return ShardScan(members, ("tar_error", f"{path}: member {info.name!r} is cut short"))
                if info.isfile():
                    members.append((info.name, info.offset_data, info.size))
    except (tarfile.TarError, OSError, EOFError) as exn:
        return ShardScan(members, ("tar_error", f"{path}: {exn!r}"))
    return ShardScan(members)


# ----------------------------------------------------------------------------------------------
# The index of one source


@dataclass
class SourceIndex:
    """Every slot of one source: a sample (its shard, key and members) or a fault.

    Slots are numbered in manifest order, then archive order; slot i is what "sample index i" of the
    source means everywhere else. Members are kept in flat arrays (a few bytes each), so the index of a
    large set stays small and is shared with forked workers without copying.
    """

    shards: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    """Sample key of each slot ('' for a fault slot)."""
    slot_shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    slot_members: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    """Slot i owns members ``slot_members[i]:slot_members[i + 1]``."""
    member_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    member_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    member_field: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    field_names: list[str] = field(default_factory=list)
    faults: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Slot -> (skip reason, detail) of the fault slots."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_samples(self) -> int:
        """Slots that hold a sample (not a fault)."""
        return len(self.keys) - len(self.faults)

    def describe(self, slot: int) -> str:
        """``key in shard`` of a slot, for skip messages."""
        return f"{self.keys[slot] or '<fault>'} in {self.shards[int(self.slot_shard[slot])]}"

    def read(self, slot: int) -> dict:
        """The raw sample of a slot, as webdataset would group it: ``{"__key__", "__url__", field: bytes}``.

        Raises:
            SampleError: a fault slot (its reason), or the shard cannot be read any more
                (``missing_shard``, ``tar_error``).
        """
        if slot in self.faults:
            raise SampleError(*self.faults[slot])
        url = self.shards[int(self.slot_shard[slot])]
        first, last = int(self.slot_members[slot]), int(self.slot_members[slot + 1])
        sample: dict = {"__key__": self.keys[slot], "__url__": url}
        try:
            fd = os.open(url, os.O_RDONLY)
        except FileNotFoundError as exn:
            raise SampleError("missing_shard", repr(exn)) from exn
        except OSError as exn:
            raise SampleError("tar_error", repr(exn)) from exn
        try:
            for m in range(first, last):
                sample[self.field_names[self.member_field[m]]] = _read_exactly(
                    fd, int(self.member_offset[m]), int(self.member_size[m]))
        finally:
            os.close(fd)
        return sample


def _read_exactly(fd: int, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``; a short read means the shard changed since it was indexed."""
    try:
        data = os.pread(fd, size, offset)
    except OSError as exn:
        raise SampleError("tar_error", repr(exn)) from exn
    if len(data) != size:
        raise SampleError("tar_error", f"short read at byte {offset}: the shard changed after indexing")
    return data


def _group(members: list[Member]) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Consecutive members sharing a key form one sample (webdataset's rule); members without a field
    belong to no sample and are left out, as webdataset leaves them out."""
    groups: list[tuple[str, list[tuple[str, int, int]]]] = []
    for name, offset, size in members:
        key, field_name = split_member(name)
        if not field_name:
            continue
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append((field_name, offset, size))
    return groups


class _IndexBuilder:
    """Accumulates the slots of one source, shard by shard."""

    def __init__(self) -> None:
        self.index = SourceIndex()
        self._shard_ids: list[int] = []
        self._starts: list[int] = [0]
        self._offsets: list[int] = []
        self._sizes: list[int] = []
        self._fields: list[int] = []
        self._field_ids: dict[str, int] = {}

    def add_shard(self, url: str, scan: ShardScan) -> None:
        """Add the samples of one scanned shard, then its fault slot if it has one."""
        shard = len(self.index.shards)
        self.index.shards.append(url)
        for key, members in _group(scan.members):
            names = [name for name, _, _ in members]
            if len(set(names)) != len(names):
                self._slot(shard, "", [], fault=("tar_error", f"{url}: a field of sample {key!r} appears twice"))
            else:
                self._slot(shard, key, members)
        if scan.fault is not None:
            self._slot(shard, "", [], fault=scan.fault)

    def _slot(self, shard: int, key: str, members: list[tuple[str, int, int]],
              fault: tuple[str, str] | None = None) -> None:
        if fault is not None:
            self.index.faults[len(self.index.keys)] = fault
        for name, offset, size in members:
            self._offsets.append(offset)
            self._sizes.append(size)
            self._fields.append(self._field_ids.setdefault(name, len(self._field_ids)))
        self.index.keys.append(key)
        self._shard_ids.append(shard)
        self._starts.append(len(self._offsets))

    def finish(self) -> SourceIndex:
        """The finished index with its flat arrays."""
        idx = self.index
        idx.slot_shard = np.asarray(self._shard_ids, dtype=np.int32)
        idx.slot_members = np.asarray(self._starts, dtype=np.int64)
        idx.member_offset = np.asarray(self._offsets, dtype=np.int64)
        idx.member_size = np.asarray(self._sizes, dtype=np.int64)
        idx.member_field = np.asarray(self._fields, dtype=np.int16)
        idx.field_names = sorted(self._field_ids, key=self._field_ids.__getitem__)
        return idx


def index_source(urls: list[str]) -> SourceIndex:
    """Index every shard of one source (headers only).

    Args:
        urls: The source's shard files, in manifest order.

    Returns:
        Its :class:`SourceIndex`; damaged shards are logged once here and become fault slots.
    """
    builder = _IndexBuilder()
    damaged = []
    for url in urls:
        scan = scan_shard(url)
        builder.add_shard(url, scan)
        if scan.fault is not None:
            damaged.append(scan.fault)
    index = builder.finish()
    if damaged:
        log.warning("data: %d of %d shards cannot be read completely (first: %s: %s); their readable samples "
                    "are used and each damage is counted as a skip when the order reaches it", len(damaged),
                    len(urls), *damaged[0], extra={"all_ranks": True})
    return index
