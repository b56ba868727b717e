"""Logging for every process: one line per event on stderr, plain text or JSON lines.

Payment decisions are logged with `log_event(logger, "payment", tx_id=..., outcome=...)`
so both formats carry the same key=value fields. Never log secrets or tracebacks caused
by a peer's bad input (those are logged as one line at INFO).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import Any, TextIO

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _safe(value: object) -> object:
    """A peer's text (memo, reject reason) may hold newlines or terminal escapes: shown
    escaped, it can neither forge a log line nor drive the terminal."""
    # isprintable() (C, no regex) is true for every string without a control character.
    if isinstance(value, str) and not value.isprintable() and _CONTROL.search(value):
        return repr(value)
    return value


class _PlainFormatter(logging.Formatter):
    _second = -1
    _hms = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._hms = time.strftime("%H:%M:%S", time.localtime(second))
        ts = self._hms
        ms = int(record.msecs)
        fields = getattr(record, "fields", None)
        text = record.getMessage()
        if fields:
            text += " " + " ".join(f"{k}={_safe(v)}" for k, v in fields.items() if v is not None)
        line = f"{ts}.{ms:03d} {record.levelname.lower():7} {record.name}: {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            obj.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class _TurnFlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that writes every line but flushes once per event-loop turn
    (warnings and errors, and lines logged outside a running loop, at once), so a busy
    router does not pay one write() per payment line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or self._flush_scheduled:
            if record.levelno >= logging.WARNING:
                self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._turn_flush)

    def _turn_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        # A log line that cannot be written (disk full, file-size limit) must never
        # stop the service; an unbuffered handler swallows the same error in `emit`.
        try:
            super().flush()
        except (OSError, ValueError):
            pass


def _block_buffered_stderr() -> TextIO | None:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # a replaced stderr (tests): write to it directly
    return open(fd, "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace",
                closefd=False)


def setup_logging(*, json_lines: bool = False, level: str = "INFO") -> None:
    # Fields no formatter here uses; skipping them makes each record cheaper
    # (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record (same HOWTO section)
    stream = _block_buffered_stderr()
    handler: logging.Handler = (logging.StreamHandler(sys.stderr) if stream is None
                                else _TurnFlushingHandler(stream))
    handler.setFormatter(_JsonFormatter() if json_lines else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (rendered key=value, or JSON keys)."""
    logger.log(level, msg, extra={"fields": fields})
