"""Per-layer conversion progress: bars on a terminal, periodic log lines elsewhere.

Conversions of large images take minutes; an operator at a terminal wants to see each
layer move, while CI logs and the convert-server want a few parseable lines instead of
carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from common.logging import get_logger

log = get_logger(__name__)
LOG_INTERVAL = 5.0


class LayerProgress:
    """Tracks bytes read per layer; use as a context manager around a conversion."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._done: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    def __enter__(self) -> LayerProgress:
        if self.interactive:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add_layer(self, digest: str, total: int, label: str) -> None:
        """Register a layer of ``total`` compressed bytes."""
        self._totals[digest] = total
        self._done[digest] = 0
        self._last_log[digest] = time.monotonic()
        if self._progress is not None:
            self._tasks[digest] = self._progress.add_task(label, total=total)

    def advance(self, digest: str, nbytes: int) -> None:
        """Record ``nbytes`` more of the layer processed."""
        self._done[digest] = self._done.get(digest, 0) + nbytes
        if self._progress is not None and digest in self._tasks:
            self._progress.update(self._tasks[digest], completed=self._done[digest])
            return
        now = time.monotonic()
        if now - self._last_log.get(digest, 0.0) >= LOG_INTERVAL:
            self._last_log[digest] = now
            log.info(
                "convert.layer_progress",
                layer=digest,
                done=self._done[digest],
                total=self._totals.get(digest),
            )

    def finish_layer(self, digest: str) -> None:
        """Mark the layer complete."""
        if self._progress is not None and digest in self._tasks:
            self._progress.update(self._tasks[digest], completed=self._totals[digest])
        else:
            log.info("convert.layer_done", layer=digest, total=self._totals.get(digest))
