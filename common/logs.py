"""Logging for every process: one line per event on stderr, plain text or JSON lines.

Payment decisions are logged with `log_event(logger, "payment", tx_id=..., outcome=...)`
so both formats carry the same key=value fields. Never log secrets or tracebacks caused
by a peer's bad input (those are logged as one line at INFO).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

from common.limits import Throttle


def _safe(value: object) -> object:
    """A field's value in a plain log line (logfmt's rule): a peer's text (memo, reject
    reason, claimed id) quoted and escaped when it holds a space, `=`, a quote or anything
    not printable, so it can neither forge a line or a field nor drive the terminal."""
    if isinstance(value, str) and (not value.isprintable() or " " in value or "=" in value
                                   or '"' in value):
        return json.dumps(value, ensure_ascii=not value.isprintable())
    return value


class _PlainFormatter(logging.Formatter):
    _second = -1
    _hms = ""

    def format(self, record: logging.LogRecord) -> str:
        line = self.render(record.created, record.levelname, record.name, record.getMessage(),
                           getattr(record, "fields", None))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def render(self, created: float, levelname: str, name: str, text: str,
               fields: dict[str, Any] | None) -> str:
        """The line for a record without exc_info (also `log_event`'s fast path)."""
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._hms = time.strftime("%H:%M:%S", time.localtime(second))
        ts = self._hms
        ms = int((created - second) * 1000)  # LogRecord.msecs
        if fields:
            parts = [text]
            for k, v in fields.items():  # a loop: ~30% cheaper than join(genexpr) here
                if v is not None:
                    parts.append(f"{k}={_safe(v) if isinstance(v, str) else v}")
            text = " ".join(parts)
        return f"{ts}.{ms:03d} {levelname.lower():7} {name}: {text}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = self._obj(record.created, record.levelname, record.name, record.getMessage(),
                        getattr(record, "fields", None))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)

    def render(self, created: float, levelname: str, name: str, text: str,
               fields: dict[str, Any] | None) -> str:
        """The line for a record without exc_info (also `log_event`'s fast path)."""
        return json.dumps(self._obj(created, levelname, name, text, fields), default=str)

    @staticmethod
    def _obj(created: float, levelname: str, name: str, text: str,
             fields: dict[str, Any] | None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "ts": round(created, 6),
            "level": levelname.lower(),
            "logger": name,
            "msg": text,
        }
        if fields:
            obj.update({k: v for k, v in fields.items() if v is not None})
        return obj


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
        self._after_write(record.levelno)

    def emit_event(self, created: float, levelno: int, name: str, msg: str,
                   fields: dict[str, Any]) -> None:
        """`log_event`'s fast path: the line `emit` would write for the same record,
        rendered without a LogRecord (the handler's level and filters checked by the
        caller)."""
        fmt = self.formatter
        assert isinstance(fmt, (_PlainFormatter, _JsonFormatter))
        self.acquire()  # as Handler.handle does around emit
        try:
            try:
                self.stream.write(fmt.render(created, logging.getLevelName(levelno), name, msg,
                                             fields) + self.terminator)
            except Exception:
                self.handleError(_record(name, levelno, msg, fields))
                return
            self._after_write(levelno)
        finally:
            self.release()

    def _after_write(self, levelno: int) -> None:
        if levelno >= logging.WARNING or self._flush_scheduled:
            if levelno >= logging.WARNING:
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


# `--log-level` of the services (argparse `choices`, any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "WARN", "FATAL", "NOTSET")


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
    global _fast_handler
    _fast_handler = handler if isinstance(handler, _TurnFlushingHandler) else None


# The handler `log_event` may write to directly (set by `setup_logging`).
_fast_handler: _TurnFlushingHandler | None = None


def _fast_path_ok(logger: logging.Logger, handler: logging.Handler, level: int) -> bool:
    """True if `logger.log` would hand the record to `handler` alone, with no filter on
    the way and the handler's level passed (the caller checked `isEnabledFor`)."""
    if handler.filters or level < handler.level or type(handler.formatter) not in _FAST_FORMATS:
        return False
    c: logging.Logger | None = logger
    while c is not None:
        if c.filters:
            return False
        if c.handlers:
            return c is logging.root and len(c.handlers) == 1 and c.handlers[0] is handler
        if not c.propagate:
            return False
        c = c.parent
    return False


_FAST_FORMATS = (_PlainFormatter, _JsonFormatter)


def _record(name: str, level: int, msg: str, fields: dict[str, Any]) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, "(log_event)", 0, msg, None, None)
    rec.fields = fields
    return rec


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (rendered key=value, or JSON keys).

    With the handler `setup_logging` installed as the only one on the way, the line is
    rendered straight into it (same text, same level checks) without a LogRecord."""
    handler = _fast_handler
    if handler is not None and logger.isEnabledFor(level) and _fast_path_ok(logger, handler,
                                                                             level):
        handler.emit_event(time.time(), level, logger.name, msg, fields)
        return
    logger.log(level, msg, extra={"fields": fields})


class ThrottledEvents:
    """Events a peer can cause as fast as it likes (refused connections, failed logins,
    TLS failures): at most one line a second per kind, the next one saying how many were
    held back (`held_back=N`). Kinds should be a small set (a reason, not a peer)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._throttles: dict[str, Throttle] = {}

    def event(self, kind: str, msg: str, level: int = logging.INFO, **fields: Any) -> None:
        throttle = self._throttles.get(kind)
        if throttle is None:
            throttle = self._throttles[kind] = Throttle()
        held = throttle.allow(time.monotonic())
        if held is not None:
            log_event(self._logger, msg, level, **fields, held_back=held or None)
