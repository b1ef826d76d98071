"""The file table of a layer index: its row layout and the rules a row is held to.

A row is an array of the fields in ``ROW_FIELDS``, decoded from a registry artifact and
so hostile until every check has passed. A big layer's table has tens of thousands of
rows and is checked while a pull waits, so plainly valid tables are checked column by
column and plainly valid rows by cheap C-level checks; anything unusual goes through
the checks that name the row and field at fault.
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any

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
    all_of_type,
    all_within,
    check_placement,
    is_normalized,
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
_REG_CODE = ENTRY_TYPES.index("reg")
_SYMLINK_CODE = ENTRY_TYPES.index("symlink")
_PLAIN_TYPE_CODES = frozenset(ENTRY_TYPES.index(kind) for kind in ("reg", "dir", "symlink"))


def encode_row(entry: TocEntry, offset_gap: int) -> list[Any]:
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


def all_row_shaped(rows: list[Any]) -> bool:
    """Whether every row (of a non-empty table) is an array of as many fields as a row
    has, decided by C-level set and map calls."""
    return set(map(type, rows)) == {list} and set(map(len, rows)) == {len(ROW_FIELDS)}


def check_table(rows: list[Any], uncompressed_size: int) -> list[TocEntry]:
    """The entries of a decoded file table, every row checked (IndexFormatError naming
    the row at fault otherwise)."""
    plain = _plain_table(rows, uncompressed_size)
    return plain if plain is not None else _table_row_by_row(rows, uncompressed_size)


def _table_row_by_row(rows: list[Any], uncompressed_size: int) -> list[TocEntry]:
    entries: list[TocEntry] = []
    previous_end = 0
    for number, row in enumerate(rows):
        entry = check_row(row, number, previous_end)
        if entry.offset + entry.size > uncompressed_size:
            raise IndexFormatError(f"entry {entry.name!r} lies past the end of the layer")
        previous_end = entry.offset + entry.size
        entries.append(entry)
    return entries


def _plain_table(rows: list[Any], uncompressed_size: int) -> list[TocEntry] | None:
    """The entries of a file table every row of which is plainly valid (see
    ``_plainly_valid``), checked and built column by column with C-level set, min, max
    and join operations: the rows one at a time, in Python, were most of a big layer's
    parse while its pull waited. None means "some row needs a closer look": the caller then
    goes row by row, which names the row at fault. Types are checked before anything
    hashes or compares a column, so hostile values cannot raise here."""
    if not rows:
        return []
    if not all_row_shaped(rows):
        return None
    columns = list(zip(*rows, strict=False))  # lengths checked above
    names, codes, sizes, modes, uids, gids, unames, gnames = columns[:8]
    mtimes, links, majors, minors, xattrs, gaps, digests = columns[8:]
    if not (
        all_of_type(str, names, unames, gnames, links)
        and all_of_type(int, codes, sizes, modes, uids, gids, majors, minors, gaps)
        and all_of_type(dict, xattrs)
        and all_of_type(bytes, digests)
        and set(map(type, mtimes)) <= {int, float}
    ):
        return None
    valid = (
        all_normalized(names)
        # No whiteout prefix in any name: a match cannot span two names, as the
        # prefix holds no "\n".
        and WHITEOUT_PREFIX not in "\n".join(names)
        and set(codes) <= _PLAIN_TYPE_CODES
        and all_within(sizes, 0, MAX_ENTRY_SIZE)
        and set(itertools.compress(codes, sizes)) <= {_REG_CODE}
        and all_within(modes, 0, 0o7777)
        and all_within(uids, 0, MAX_ID)
        and all_within(gids, 0, MAX_ID)
        and max(map(len, unames)) <= MAX_OWNER_NAME
        and max(map(len, gnames)) <= MAX_OWNER_NAME
        and "\0" not in "".join(itertools.chain(unames, gnames, links))
        and min(mtimes) > -MAX_MTIME
        and max(mtimes) < MAX_MTIME
        and not any(map(math.isnan, mtimes))  # after max: isnan overflows on huge ints
        and max(map(len, links)) <= MAX_NAME_BYTES
        and set(itertools.compress(codes, links)) <= {_SYMLINK_CODE}
        and set(majors) == {0}
        and set(minors) == {0}
        and not any(xattrs)
        and all_within(gaps, 0, MAX_LAYER_SIZE)
        and not any(digests)
    )
    if not valid:
        return None
    ends = list(itertools.accumulate(map(operator.add, gaps, sizes)))
    if ends[-1] > uncompressed_size:
        return None  # row by row names the entry that lies past the end
    return list(
        map(
            TocEntry,
            names,
            map(ENTRY_TYPES.__getitem__, codes),
            sizes,
            modes,
            uids,
            gids,
            unames,
            gnames,
            map(float, mtimes),
            links,
            majors,
            minors,
            xattrs,
            map(operator.sub, ends, sizes),
            itertools.repeat("", len(rows)),
        )
    )


def check_row(row: Any, number: int, previous_end: int) -> TocEntry:
    """One decoded file-table row, held to the same rules as a tar header in toc.py.

    A big layer has tens of thousands of rows and the agent parses its index while
    containerd waits on the pull, so rows that are plainly fine (the rule) take a path
    of cheap C-level checks; anything unusual goes through the checks that say what is
    wrong."""
    if _plainly_valid(row):
        return _make_entry(row, ENTRY_TYPES[row[1]], previous_end + row[13])
    return _checked_entry(row, number, previous_end)


def _plainly_valid(row: Any) -> bool:
    """A row every field of which is of the common, obviously sane kind: a normalized
    short name without whiteouts, a file/dir/symlink, in-range numbers, no xattrs, no
    digest. False means "look closer", not "invalid"."""
    if type(row) is not list or len(row) != len(ROW_FIELDS):
        return False
    name, code, size, mode, uid, gid, uname, gname, mtime, link, major, minor = row[:12]
    return (
        type(name) is str
        and is_normalized(name)
        and WHITEOUT_PREFIX not in name
        and type(code) is int
        and code in _PLAIN_TYPE_CODES
        and type(size) is int
        and 0 <= size <= (MAX_ENTRY_SIZE if code == _REG_CODE else 0)
        and type(mode) is int
        and 0 <= mode <= 0o7777
        and type(uid) is int
        and 0 <= uid <= MAX_ID
        and type(gid) is int
        and 0 <= gid <= MAX_ID
        and type(uname) is str
        and len(uname) <= MAX_OWNER_NAME
        and "\0" not in uname
        and type(gname) is str
        and len(gname) <= MAX_OWNER_NAME
        and "\0" not in gname
        and type(mtime) in (int, float)
        and -MAX_MTIME < mtime < MAX_MTIME
        and type(link) is str
        and (code == _SYMLINK_CODE or not link)
        and len(link) <= MAX_NAME_BYTES
        and "\0" not in link
        and major == 0
        and minor == 0
        and type(major) is int
        and type(minor) is int
        and row[12] == {}
        and type(row[13]) is int
        and 0 <= row[13] <= MAX_LAYER_SIZE
        and row[14] == b""
    )


def _make_entry(row: list[Any], kind: str, offset: int) -> TocEntry:
    digest = row[14]
    return TocEntry(
        row[0],
        kind,
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        float(row[8]),
        row[9],
        row[10],
        row[11],
        row[12],
        offset,
        "sha256:" + digest.hex() if digest else "",
    )


def _checked_entry(row: Any, number: int, previous_end: int) -> TocEntry:
    """Every rule, one at a time, so that a refusal names the field at fault."""
    if not isinstance(row, list) or len(row) != len(ROW_FIELDS):
        raise IndexFormatError(f"toc entry {number} is not a {len(ROW_FIELDS)}-element array")
    where = f"toc entry {number}"
    name = checked_text(row[0], f"{where} name", MAX_NAME_BYTES)
    try:
        if normalize_name(name) != name:
            raise IndexFormatError(f"{where} name {name!r} is not normalized")
    except HostileLayerError as exc:
        raise IndexFormatError(f"{where}: {exc}") from None
    kind_code = checked_int(row[1], f"{where} type", len(ENTRY_TYPES) - 1)
    kind = ENTRY_TYPES[kind_code]
    try:
        check_placement(name, kind)
    except HostileLayerError as exc:
        raise IndexFormatError(f"{where}: {exc}") from None
    checked_int(row[2], f"{where} size", MAX_ENTRY_SIZE if kind == "reg" else 0)
    mtime = row[8]
    if type(mtime) not in (int, float) or not -MAX_MTIME < mtime < MAX_MTIME:
        raise IndexFormatError(f"{where} mtime must be a number")
    link = checked_text(row[9], f"{where} link name", MAX_NAME_BYTES)
    if kind == "hardlink":
        try:
            if not link or normalize_name(link) != link:
                raise IndexFormatError(f"{where} hardlink target {link!r} is not normalized")
        except HostileLayerError as exc:
            raise IndexFormatError(f"{where}: {exc}") from None
    elif kind != "symlink" and link:
        raise IndexFormatError(f"{where}: only links have a link name")
    device = kind in ("char", "block")
    xattrs = row[12]
    if not isinstance(xattrs, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) and len(v) <= MAX_XATTR_BYTES
        for k, v in xattrs.items()
    ):
        raise IndexFormatError(f"{where} xattrs must map names to at most 64 KiB of bytes")
    offset = previous_end + checked_int(row[13], f"{where} offset gap", MAX_LAYER_SIZE)
    digest = row[14]
    if not isinstance(digest, bytes) or len(digest) not in (
        (0, DIGEST_BYTES) if kind == "reg" else (0,)
    ):
        raise IndexFormatError(f"{where}: only a regular file may carry a sha256 digest")
    checked_int(row[3], f"{where} mode", 0o7777)
    checked_int(row[4], f"{where} uid", MAX_ID)
    checked_int(row[5], f"{where} gid", MAX_ID)
    checked_text(row[6], f"{where} uname", MAX_OWNER_NAME)
    checked_text(row[7], f"{where} gname", MAX_OWNER_NAME)
    checked_int(row[10], f"{where} device major", MAX_DEVICE_MAJOR if device else 0)
    checked_int(row[11], f"{where} device minor", MAX_DEVICE_MINOR if device else 0)
    return _make_entry(row, kind, offset)
