"""Layer metadata caught lying, remembered so that it is never served from again.

A file table is checked against the layer's own tar headers as files are first read
(formats/header_check.py). One mismatch shows the whole artifact is untrue, not just
the row: from then on every read of a layer mounted from it fails (EIO: a container
must never see bytes under a name or mode the image does not give them), and new pulls
of an image that refers to it fall back to another form or a plain pull. The verdict is
kept in the agent's state directory, so a restart does not trust the artifact again.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent import metrics
from common.logging import get_logger

log = get_logger(__name__)
MAX_REMEMBERED = 4096
"""Verdicts kept on disk at most (the oldest are forgotten): bounded whatever a
registry keeps pushing."""


class DistrustedMetadata:
    """Digests of metadata artifacts that contradicted their layer, with why."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._reasons: dict[str, str] = self._load()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acceld-distrust")
        """Saving runs off the event loop: a read's answer must not wait on the disk."""

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            loaded = json.loads(self.path.read_bytes()[: 1 << 20])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("distrust.unreadable", path=str(self.path), error=str(exc))
            return {}
        if not isinstance(loaded, dict):
            return {}
        return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}

    def reason(self, digest: str) -> str | None:
        """Why the metadata of this digest is distrusted, or None if it is not."""
        return self._reasons.get(digest)

    def mark(self, digest: str, kind: str, layer: str, reason: str) -> None:
        """Distrust ``digest`` from now on (logged and counted once)."""
        if digest in self._reasons:
            return
        self._reasons[digest] = reason
        while len(self._reasons) > MAX_REMEMBERED:
            del self._reasons[next(iter(self._reasons))]
        metrics.DISTRUSTED_METADATA.labels(kind).inc()
        log.error("distrust.metadata", metadata=digest, kind=kind, layer=layer, reason=reason)
        if self.path is not None:
            self._writer.submit(self._save, dict(self._reasons))

    def _save(self, reasons: dict[str, str]) -> None:
        assert self.path is not None
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            partial.write_text(json.dumps(reasons))
            os.replace(partial, self.path)
        except OSError as exc:
            log.error("distrust.unsaved", path=str(self.path), error=str(exc))
