"""The eStargz layer format: names, limits, the footer and the JSON TOC's field layout.

eStargz (containerd/stargz-snapshotter, docs/estargz.md) is a gzip'd tar in which every
regular file's data starts a new gzip member (large files are cut into chunks, one member
each), followed by a gzip member holding the tar entry ``stargz.index.json`` (the TOC)
and a 51-byte empty gzip member whose Extra field says where the TOC member starts. The
writer and the reader share this module so that both sides agree on every byte and every
field name; the format is a compatibility contract with stargz-snapshotter, so the
spellings here follow its spec, not our own naming.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Sequence
from typing import Final

from formats.fast_zlib import ZLIB
from formats.toc import HostileLayerError

TOC_TAR_NAME: Final = "stargz.index.json"
PREFETCH_LANDMARK: Final = ".prefetch.landmark"
NO_PREFETCH_LANDMARK: Final = ".no.prefetch.landmark"
LANDMARK_NAMES: Final = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
LANDMARK_CONTENTS: Final = b"\x0f"
"""Landmarks are one-byte regular files: the spec's "4 bits contents 0xf"."""

TOC_DIGEST_ANNOTATION: Final = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION: Final = "io.containers.estargz.uncompressed-size"

TOC_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 1 << 20
"""A member is inflated whole, so a read costs its members: smaller ones cost a TOC record
each and lose a little compression at each restart, far less than a start saves."""
FOOTER_SIZE: Final = 51

MAX_TOC_JSON_BYTES: Final = 128 << 20
"""About 400k entries; beyond that a TOC is an attack on the agent's memory, not a layer."""
MAX_TOC_ENTRIES: Final = 1_000_000
TOC_BYTES_PER_VALUE: Final = 6
"""The fewest bytes of JSON a TOC may spend per '{', '[' or ',' (one per value, counted
before parsing). An entry's smallest field (``,"uid":0``) takes 8, and the smallest
entry (``{"name":"a","type":"dir"},``) 26 for three; the margin is for brackets and
commas inside names, which count too. Held to it, a TOC cannot make the JSON parser
build Python objects much faster per byte than a TOC of the smallest entries does,
whereas ``[],`` turned every 3 bytes into a list of 56 bytes and more."""
MAX_CHUNK_BYTES: Final = 256 << 20
"""The agent inflates a chunk in memory; real writers cut chunks at 4 MiB by default."""

GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
TAR_BLOCK: Final = 512
TAR_END_OF_ARCHIVE: Final = bytes(2 * TAR_BLOCK)

_FOOTER_MAGIC: Final = b"STARGZ"
_FOOTER_SUBFIELD_ID: Final = b"SG"
_FOOTER_SUBFIELD_LEN: Final = 16 + len(_FOOTER_MAGIC)
# gzip header: ID1 ID2 CM=deflate FLG=FEXTRA MTIME=0 XFL=0 OS=255(unknown), then XLEN.
_FOOTER_HEADER: Final = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack(
    "<H", 4 + _FOOTER_SUBFIELD_LEN
)
# One final stored block of length 0, then CRC32 and ISIZE of the empty payload.
_FOOTER_TRAILER: Final = b"\x01\x00\x00\xff\xff" + bytes(8)
_HEX16: Final = re.compile(rb"[0-9a-f]{16}")
_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_DIGEST_LINES: Final = re.compile(r"(?:sha256:[0-9a-f]{64}\n)*")
_DIGEST_CHARS: Final = len("sha256:") + 64


class EstargzFormatError(HostileLayerError):
    """A blob that is not (or not safely) an eStargz layer: bad footer, TOC or offsets.

    A HostileLayerError, so that callers have one error to catch for "do not serve"."""


class TocDigestError(EstargzFormatError):
    """The TOC's sha256 differs from the digest the manifest annotation vouches for."""


class ChunkDigestError(EstargzFormatError):
    """A chunk's bytes do not inflate to exactly the data its TOC chunkDigest names."""


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte footer pointing at the TOC's gzip member (byte-identical to Go's)."""
    if not 0 <= toc_offset < 1 << 63:
        raise ValueError(f"TOC offset out of range: {toc_offset}")
    subfield = b"%016x" % toc_offset + _FOOTER_MAGIC
    extra = _FOOTER_SUBFIELD_ID + struct.pack("<H", len(subfield)) + subfield
    footer = _FOOTER_HEADER + extra + _FOOTER_TRAILER
    assert len(footer) == FOOTER_SIZE
    return footer


def parse_footer(tail: bytes, blob_size: int) -> int:
    """The TOC offset from a blob's last bytes (at least FOOTER_SIZE of them).

    Checked field by field rather than trusted: a wrong offset would make the agent
    fetch and inflate an arbitrary range.
    """
    if blob_size < FOOTER_SIZE or len(tail) < FOOTER_SIZE:
        raise EstargzFormatError(f"blob too small for an eStargz footer ({blob_size} bytes)")
    footer = tail[-FOOTER_SIZE:]
    header_len = len(_FOOTER_HEADER)
    if footer[:header_len] != _FOOTER_HEADER:
        raise EstargzFormatError("no eStargz footer: wrong gzip header or Extra length")
    extra = footer[header_len : header_len + 4 + _FOOTER_SUBFIELD_LEN]
    if extra[:2] != _FOOTER_SUBFIELD_ID or struct.unpack("<H", extra[2:4])[0] != len(extra) - 4:
        raise EstargzFormatError("no eStargz footer: wrong Extra subfield")
    hex_offset, magic = extra[4:20], extra[20:]
    if magic != _FOOTER_MAGIC or not _HEX16.fullmatch(hex_offset):
        raise EstargzFormatError("no eStargz footer: missing STARGZ magic or hex offset")
    inflater = ZLIB.decompressobj(GZIP_WBITS)
    try:
        payload = inflater.decompress(footer)
    except ZLIB.error as exc:
        raise EstargzFormatError(f"eStargz footer is not a gzip member: {exc}") from None
    if payload or not inflater.eof or inflater.unused_data:
        raise EstargzFormatError("eStargz footer is not one empty gzip member")
    toc_offset = int(hex_offset, 16)
    if toc_offset >= blob_size - FOOTER_SIZE:
        raise EstargzFormatError(f"TOC offset {toc_offset} beyond the blob ({blob_size} bytes)")
    return toc_offset


def is_sha256_digest(value: object) -> bool:
    """Whether ``value`` is an OCI sha256 digest string, as TOC digests must be."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def tar_padding(size: int) -> bytes:
    """Zero bytes that pad a tar entry's data of ``size`` bytes to a block boundary."""
    return bytes(-size % TAR_BLOCK)


def all_sha256_digests(values: Sequence[str]) -> bool:
    """Whether every one of a column of strings is a sha256 digest, in one regex pass
    over the column joined by newlines. Each value must be exactly a digest long, so one
    value holding a newline cannot pass as two digests."""
    return set(map(len, values)) <= {_DIGEST_CHARS} and bool(
        _DIGEST_LINES.fullmatch("\n".join(values) + "\n")
    )
