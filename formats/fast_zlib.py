"""The fastest zlib at hand, for the formats that inflate or deflate in bulk.

zlib-ng's bindings (PyPI ``zlib-ng``) when installed, else CPython's zlib: same API,
same streams. zlib-ng deflates much faster at level 6 for slightly more bytes, which is
what keeps full-mode conversion within pigz's time; the eStargz reader inflates chunks
with it, and index-only spans are inflated with it too (faster than the system zlib).
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Iterator
from types import ModuleType
from typing import Final


def _fastest_zlib() -> ModuleType:
    try:
        return importlib.import_module("zlib_ng.zlib_ng")
    except ImportError:
        return zlib


ZLIB: Final = _fastest_zlib()

GZIP_MEMBERS_WBITS: Final = 16 + zlib.MAX_WBITS


class MemberInflater:
    """Inflates a gzip stream of any number of members, block by block as it arrives.

    Output is taken at most ``limit`` bytes at a time: a member of zeros inflates a
    thousandfold, and a caller that hashes or walks the output never holds more."""

    def __init__(self, limit: int = 8 << 20) -> None:
        self._limit = limit
        self._inflater = ZLIB.decompressobj(GZIP_MEMBERS_WBITS)

    def feed(self, block: bytes) -> Iterator[bytes]:
        """The inflated bytes ``block`` completes (zlib.error on a corrupt stream)."""
        while True:
            data = self._inflater.decompress(block, self._limit)
            if data:
                yield data
            if self._inflater.eof:
                block = self._inflater.unused_data
                self._inflater = ZLIB.decompressobj(GZIP_MEMBERS_WBITS)
                if not block:
                    return
            else:
                block = self._inflater.unconsumed_tail
                if not block and len(data) < self._limit:
                    return
