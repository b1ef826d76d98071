"""The file table of a layer index: its row layout and the rules a row is held to, each
stated once.

A row is an array of the fields in ``ROW_FIELDS``, decoded from a registry artifact and
so hostile until every rule has passed. Each rule below is one object that knows two
ways to apply itself, written side by side: ``check`` to one value, naming the row and
field at fault (``check_row``), and ``holds`` to a whole column at once with C-level
set, min, max and join calls (``table_by_columns``), because a big layer's table has
tens of thousands of rows and is checked while a pull waits. A column form may decline
a table its rows would pass (names: ``all_normalized`` is a sufficient condition of
``normalize_name``), never the reverse: ``check_table`` then goes row by row, and
tests/test_layer_index.py holds the two paths to the same outcome on generated tables.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from formats.layer_index import (
    DIGEST_BYTES,
    MAX_LAYER_SIZE,
    IndexFormatError,
    checked_int,
    checked_text,
)
from formats.toc import (
    ENTRY_TYPES,
    MAX_DEVICE_MAJOR,
    MAX_DEVICE_MINOR,
    MAX_ENTRY_SIZE,
    MAX_ID,
    MAX_MTIME,
    MAX_NAME_BYTES,
    MAX_OWNER_NAME,
    MAX_XATTR_BYTES,
    WHITEOUT_PREFIX,
    HostileLayerError,
    TocEntry,
    all_normalized,
    all_within,
    check_placement,
    normalize_name,
)

ROW_FIELDS = (
    "name",
    "type",
    "size",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "mtime",
    "link_name",
    "dev_major",
    "dev_minor",
    "xattrs",
    "offset_gap",
    "digest",
)
"""A row's fields in order: a TocEntry's, with the type as its number in ENTRY_TYPES,
the offset as the gap after the previous row's data, and the digest as raw bytes."""
NAME, TYPE, SIZE, MODE, UID, GID, UNAME, GNAME, MTIME = range(9)
LINK, DEV_MAJOR, DEV_MINOR, XATTRS, GAP, DIGEST = range(9, len(ROW_FIELDS))
_TYPE_CODES = {name: code for code, name in enumerate(ENTRY_TYPES)}


def encode_row(entry: TocEntry, offset_gap: int) -> list[Any]:
    """The row for ``entry``, whose data starts ``offset_gap`` after the previous row's."""
    mtime: int | float = int(entry.mtime) if entry.mtime.is_integer() else entry.mtime
    digest = b""  # span digests verify every byte served; per-file ones would double the TOC
    return [
        entry.name,
        _TYPE_CODES[entry.type],
        entry.size,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.uname,
        entry.gname,
        mtime,
        entry.link_name,
        entry.dev_major,
        entry.dev_minor,
        entry.xattrs,
        offset_gap,
        digest,
    ]


class _Rule(Protocol):
    @property
    def column(self) -> int:
        """The row field the rule is about."""

    @property
    def types(self) -> frozenset[type]:
        """The exact types the field may have; a column is only compared or hashed
        once every value in it is of these."""

    def check(self, value: Any, kind: str, where: str) -> None:
        """Refuse ``value`` for an entry of ``kind`` (IndexFormatError naming it)."""

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        """Whether ``check`` passes every value of a column (``codes``: each row's
        type); False means "look row by row", not "invalid"."""


def _only_for(kinds: frozenset[str] | None, codes: Sequence[int], values: Sequence[Any]) -> bool:
    """Whether the column's non-zero, non-empty values are all in rows of ``kinds``."""
    if kinds is None:
        return True
    allowed = {_TYPE_CODES[kind] for kind in kinds}
    return set(itertools.compress(codes, values)) <= allowed


@dataclass(frozen=True)
class _Count:
    """An integer in 0..``maximum``; 0 in entries of kinds outside ``kinds`` (if given)."""

    column: int
    label: str
    maximum: int
    kinds: frozenset[str] | None = None
    types = frozenset({int})

    def check(self, value: Any, kind: str, where: str) -> None:
        bound = self.maximum if self.kinds is None or kind in self.kinds else 0
        checked_int(value, f"{where} {self.label}", bound)

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        return all_within(values, 0, self.maximum) and _only_for(self.kinds, codes, values)


@dataclass(frozen=True)
class _Text:
    """A string of at most ``maximum`` characters without NUL; empty in entries of
    kinds outside ``kinds`` (if given)."""

    column: int
    label: str
    maximum: int
    kinds: frozenset[str] | None = None
    types = frozenset({str})

    def check(self, value: Any, kind: str, where: str) -> None:
        checked_text(value, f"{where} {self.label}", self.maximum)
        if value and self.kinds is not None and kind not in self.kinds:
            raise IndexFormatError(f"{where}: a {kind} entry has no {self.label}")

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        return (
            max(map(len, values)) <= self.maximum
            and "\0" not in "".join(values)
            and _only_for(self.kinds, codes, values)
        )


def _normalized(name: str, where: str, what: str) -> None:
    try:
        if normalize_name(name) != name:
            raise IndexFormatError(f"{where} {what} {name!r} is not normalized")
    except HostileLayerError as exc:
        raise IndexFormatError(f"{where}: {exc}") from None


class _Name:
    """A path as toc.py leaves it: normalized, and one the layer tree can place (the
    root only as a directory, no whiteout of nothing)."""

    column = NAME
    types = frozenset({str})

    def check(self, value: Any, kind: str, where: str) -> None:
        checked_text(value, f"{where} name", MAX_NAME_BYTES)
        _normalized(value, where, "name")
        try:
            check_placement(value, kind)
        except HostileLayerError as exc:
            raise IndexFormatError(f"{where}: {exc}") from None

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        # The prefix holds no "\n", so a match cannot span two names.
        if "" in values or WHITEOUT_PREFIX in "\n".join(values):
            # The few names check_placement has anything to say about (the root and
            # whiteouts), picked out by C-level maps.
            matters = map(
                operator.or_,
                map(operator.not_, values),
                map(operator.contains, values, itertools.repeat(WHITEOUT_PREFIX)),
            )
            odd = itertools.compress(zip(values, codes, strict=True), matters)
            if not all(_placeable(name, ENTRY_TYPES[code]) for name, code in odd):
                return False
            values = list(filter(None, values))  # the root is "" normalized
        return all_normalized(values)


def _placeable(name: str, kind: str) -> bool:
    try:
        check_placement(name, kind)
    except HostileLayerError:
        return False
    return True


class _HardlinkTarget:
    """A hard link names a normalized path (toc.py checks it names an earlier file)."""

    column = LINK
    types = frozenset({str})

    def check(self, value: Any, kind: str, where: str) -> None:
        if kind != "hardlink":
            return
        if not value:
            raise IndexFormatError(f"{where} hardlink target {value!r} is not normalized")
        _normalized(value, where, "hardlink target")

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        targets = itertools.compress(values, map(_TYPE_CODES["hardlink"].__eq__, codes))
        return all_normalized(list(targets))


class _Mtime:
    """Seconds, whole or not, short of any date a file system stores."""

    column = MTIME
    types = frozenset({int, float})

    def check(self, value: Any, kind: str, where: str) -> None:
        if type(value) not in self.types or not -MAX_MTIME < value < MAX_MTIME:  # NaN too
            raise IndexFormatError(f"{where} mtime must be a number")

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        # A NaN first makes min and max NaN, which fails both comparisons; anywhere
        # else they skip it and isnan finds it, once max has ruled out huge ints
        # (which isnan overflows on).
        return (
            min(values) > -MAX_MTIME
            and max(values) < MAX_MTIME
            and not any(map(math.isnan, values))
        )


class _Xattrs:
    """Extended attributes: names to values of at most 64 KiB (the decoder bounds how
    many, msgpack how long a name)."""

    column = XATTRS
    types = frozenset({dict})

    def check(self, value: Any, kind: str, where: str) -> None:
        if not self._fine(value):
            raise IndexFormatError(f"{where} xattrs must map names to at most 64 KiB of bytes")

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        return all(map(self._fine, filter(None, values)))

    @staticmethod
    def _fine(value: Any) -> bool:
        return type(value) is dict and all(
            type(k) is str and type(v) is bytes and len(v) <= MAX_XATTR_BYTES
            for k, v in value.items()
        )


class _Digest:
    """A regular file's sha256, or nothing."""

    column = DIGEST
    types = frozenset({bytes})

    def check(self, value: Any, kind: str, where: str) -> None:
        if type(value) is not bytes or len(value) not in (
            (0, DIGEST_BYTES) if kind == "reg" else (0,)
        ):
            raise IndexFormatError(f"{where}: only a regular file may carry a sha256 digest")

    def holds(self, values: Sequence[Any], codes: Sequence[int]) -> bool:
        return set(map(len, values)) <= {0, DIGEST_BYTES} and _only_for(
            frozenset({"reg"}), codes, values
        )


_KIND = _Count(TYPE, "type", len(ENTRY_TYPES) - 1)
"""Checked first: every other rule may depend on the entry's kind."""
_DEVICES = frozenset({"char", "block"})
RULES: tuple[_Rule, ...] = (
    _Name(),
    _Count(SIZE, "size", MAX_ENTRY_SIZE, frozenset({"reg"})),
    _Mtime(),
    _Text(LINK, "link name", MAX_NAME_BYTES, frozenset({"symlink", "hardlink"})),
    _HardlinkTarget(),
    _Xattrs(),
    _Count(GAP, "offset gap", MAX_LAYER_SIZE),
    _Digest(),
    _Count(MODE, "mode", 0o7777),
    _Count(UID, "uid", MAX_ID),
    _Count(GID, "gid", MAX_ID),
    _Text(UNAME, "uname", MAX_OWNER_NAME),
    _Text(GNAME, "gname", MAX_OWNER_NAME),
    _Count(DEV_MAJOR, "device major", MAX_DEVICE_MAJOR, _DEVICES),
    _Count(DEV_MINOR, "device minor", MAX_DEVICE_MINOR, _DEVICES),
)
"""Every rule but the kind's, in the order ``check_row`` applies them."""


def check_table(rows: list[Any], uncompressed_size: int) -> list[TocEntry]:
    """The entries of a decoded file table, every rule checked (IndexFormatError naming
    the row at fault otherwise): column by column, or row by row where the columns
    decline."""
    entries = table_by_columns(rows, uncompressed_size)
    return entries if entries is not None else table_by_rows(rows, uncompressed_size)


def table_by_rows(rows: list[Any], uncompressed_size: int) -> list[TocEntry]:
    """``check_row`` on each row in turn: slower than the columns, but it names the
    row and field at fault."""
    entries: list[TocEntry] = []
    previous_end = 0
    for number, row in enumerate(rows):
        entry = check_row(row, number, previous_end)
        if entry.offset + entry.size > uncompressed_size:
            raise IndexFormatError(f"entry {entry.name!r} lies past the end of the layer")
        previous_end = entry.offset + entry.size
        entries.append(entry)
    return entries


def check_row(row: Any, number: int, previous_end: int) -> TocEntry:
    """Row ``number``, whose data starts its offset gap after ``previous_end``, as an
    entry: every rule applied in turn, so that a refusal names the field at fault."""
    where = f"toc entry {number}"
    if type(row) is not list or len(row) != len(ROW_FIELDS):
        raise IndexFormatError(f"{where} is not a {len(ROW_FIELDS)}-element array")
    _KIND.check(row[TYPE], "", where)  # the one rule that holds for entries of any kind
    kind = ENTRY_TYPES[row[TYPE]]
    for rule in RULES:
        rule.check(row[rule.column], kind, where)
    return TocEntry(
        row[NAME],
        kind,
        row[SIZE],
        row[MODE],
        row[UID],
        row[GID],
        row[UNAME],
        row[GNAME],
        float(row[MTIME]),
        row[LINK],
        row[DEV_MAJOR],
        row[DEV_MINOR],
        row[XATTRS],
        previous_end + row[GAP],
        _digest_text(row[DIGEST]),
    )


def all_row_shaped(rows: list[Any]) -> bool:
    """Whether every row (of a non-empty table) is an array of as many fields as a row
    has, decided by C-level set and map calls."""
    return set(map(type, rows)) == {list} and set(map(len, rows)) == {len(ROW_FIELDS)}


def table_by_columns(rows: list[Any], uncompressed_size: int) -> list[TocEntry] | None:
    """The entries of a table every rule holds for column by column; None means "go
    row by row", which names the row at fault (or takes what the columns declined).
    Every column's types are checked before any rule compares or hashes its values,
    so hostile values cannot raise here."""
    if not rows:
        return []
    if not all_row_shaped(rows):
        return None
    columns = list(zip(*rows, strict=False))  # lengths checked above
    rules = (_KIND, *RULES)
    if not all(set(map(type, columns[rule.column])) <= rule.types for rule in rules):
        return None
    codes = columns[TYPE]
    if not all(rule.holds(columns[rule.column], codes) for rule in rules):
        return None
    sizes = columns[SIZE]
    ends = list(itertools.accumulate(map(operator.add, columns[GAP], sizes)))
    if ends[-1] > uncompressed_size:
        return None  # row by row names the entry that lies past the end
    digests = columns[DIGEST]
    return list(
        map(
            TocEntry,
            columns[NAME],
            map(ENTRY_TYPES.__getitem__, codes),
            *columns[SIZE:MTIME],
            map(float, columns[MTIME]),
            *columns[LINK:GAP],
            map(operator.sub, ends, sizes),
            map(_digest_text, digests) if any(digests) else itertools.repeat(""),
        )
    )


def _digest_text(digest: bytes) -> str:
    return "sha256:" + digest.hex() if digest else ""
