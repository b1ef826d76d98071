"""eStargz layers for full mode: one import point for the converter and the agent.

The format lives in three modules: ``estargz_toc`` (names, footer, limits),
``estargz_writer`` (tar stream -> blob) and ``estargz_reader`` (footer/TOC -> chunks).
"""

from formats.estargz_reader import ChunkRef, EstargzToc, parse_toc, read_chunk
from formats.estargz_toc import (
    DEFAULT_CHUNK_SIZE,
    FOOTER_SIZE,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ChunkDigestError,
    EstargzFormatError,
    TocDigestError,
    footer_bytes,
    parse_footer,
)
from formats.estargz_writer import EstargzResult, write_estargz

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FOOTER_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "ChunkDigestError",
    "ChunkRef",
    "EstargzFormatError",
    "EstargzResult",
    "EstargzToc",
    "TocDigestError",
    "footer_bytes",
    "parse_footer",
    "parse_toc",
    "read_chunk",
    "write_estargz",
]
