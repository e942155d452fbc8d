"""Logging: structlog, JSON lines when not on a terminal (the service), key=value on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def setup_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for the process.

    ``json=None`` chooses JSON when stderr is not a terminal (journald, CI logs).
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    """A structlog logger with ``bind`` values (vm=, group=, epoch=, host=) attached."""
    # A lazy proxy: loggers made at import time follow setup_logging() called later.
    return structlog.get_logger(**bind)
