"""Checking a file-table row against the tar header the layer itself carries.

An index-only artifact is a claim about a layer, pushed by whoever may push to the
repository; the layer's digest, pinned by the image manifest, is what is trusted. Span
digests prove the bytes the agent inflates are the layer's, but not that the file
table describes them truly: a table could give a file another name, mode or owner, or
point a name at another file's data. The tar stream answers that. Every member's
headers sit between the end of the previous member's data and the start of its own, so
parsing the verified bytes there must yield exactly the row, with the data starting
exactly where the row says.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile

from formats.toc import (
    MAX_HEADER_CHAIN,
    BoundedTarInfo,
    HostileLayerError,
    TocEntry,
    entry_from_tarinfo,
)

BLOCK = tarfile.BLOCKSIZE


class HeaderMismatchError(ValueError):
    """The file table says something of a file that the layer's own tar header does not."""


def member_end(data_end: int) -> int:
    """Where the next member's headers start: after this one's data (ending at
    ``data_end``), padded to a block."""
    return -(-data_end // BLOCK) * BLOCK


def check_header(chain: bytes, entry: TocEntry) -> None:
    """``chain`` is the verified stream from the previous member's end to ``entry``'s
    data: it must hold exactly one member's headers, describing ``entry`` field by field
    (name, type, size, mode, owner, times, link target, device, xattrs)."""
    if not BLOCK <= len(chain) <= MAX_HEADER_CHAIN or len(chain) % BLOCK:
        raise HeaderMismatchError(
            f"{entry.name!r}: {len(chain)} bytes between members is no header chain"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(chain), mode="r:", tarinfo=BoundedTarInfo) as tar:
            info = tar.next()
            if info is None:
                raise HeaderMismatchError(f"{entry.name!r}: no tar header where its row says")
            found = entry_from_tarinfo(info)
    except (tarfile.TarError, HostileLayerError, EOFError, ValueError) as exc:
        if isinstance(exc, HeaderMismatchError):
            raise
        raise HeaderMismatchError(f"{entry.name!r}: no valid tar header there: {exc}") from None
    if info.offset_data != len(chain):
        raise HeaderMismatchError(
            f"{entry.name!r}: the header's data starts at {info.offset_data} of the chain, "
            f"the row says {len(chain)}"
        )
    claimed = dataclasses.replace(entry, offset=found.offset, digest=found.digest)
    if claimed != found:
        fields = [
            f.name
            for f in dataclasses.fields(TocEntry)
            if getattr(claimed, f.name) != getattr(found, f.name)
        ]
        raise HeaderMismatchError(
            f"{entry.name!r}: the file table differs from the layer's tar header in {fields}"
        )
