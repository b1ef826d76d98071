"""Content digests as the OCI image spec defines them (`algorithm:hex`).

Every byte acceld serves or pushes is checked against a digest, so parsing and hashing
live in one place with one notion of what a valid digest is.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


class InvalidDigestError(ValueError):
    """A string that is not an OCI digest we can verify (only sha256/sha512 are accepted)."""


def validate_digest(digest: str) -> str:
    """Return the digest unchanged, or raise: a malformed digest must never reach a URL or path."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidDigestError(f"not a valid sha256/sha512 digest: {digest!r}")
    return digest


def new_hasher(digest: str) -> hashlib._Hash:
    """A hasher of the algorithm named by ``digest``, for incremental verification."""
    algorithm = validate_digest(digest).split(":", 1)[0]
    return hashlib.new(algorithm)


def sha256_digest(data: bytes) -> str:
    """The OCI digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of_hasher(hasher: hashlib._Hash) -> str:
    """Format a finished hasher as an OCI digest."""
    return f"{hasher.name}:{hasher.hexdigest()}"


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI chain ID of a layer stack: what containerd names the committed snapshot
    of its top layer (so a tool can find an image's root file system by its config)."""
    if not diff_ids:
        raise ValueError("an image without layers has no chain ID")
    chain = validate_digest(diff_ids[0])
    for diff_id in diff_ids[1:]:
        chain = (
            "sha256:" + hashlib.sha256(f"{chain} {validate_digest(diff_id)}".encode()).hexdigest()
        )
    return chain
