"""Logging for every process: one line per event on stderr, plain text or JSON lines.

Payment decisions are logged with `log_event(logger, "payment", tx_id=..., outcome=...)`
so both formats carry the same key=value fields. Never log secrets or tracebacks caused
by a peer's bad input (those are logged as one line at INFO).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        ms = int(record.msecs)
        fields = getattr(record, "fields", None)
        text = record.getMessage()
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
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


def setup_logging(*, json_lines: bool = False, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (rendered key=value, or JSON keys)."""
    logger.log(level, msg, extra={"fields": fields})
