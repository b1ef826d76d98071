"""Structured logging for every acceld process.

One configuration so that the agent, the CLI, the rig and the tests all emit the same
key=value (terminal) or JSON (daemon, `ACCELD_LOG_FORMAT=json`) records, which is what
operators grep and ship to their log stores.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(level: str | None = None, json_format: bool | None = None) -> None:
    """Set up structlog + stdlib logging once per process; later calls are no-ops."""
    global _configured
    if _configured:
        return
    level_name = (level or os.environ.get("ACCELD_LOG_LEVEL", "INFO")).upper()
    if json_format is None:
        json_format = os.environ.get("ACCELD_LOG_FORMAT", "console") == "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_format
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=level_name, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    _configured = True


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """Return a bound logger named after the module, so records say where they come from."""
    return structlog.get_logger(name)
