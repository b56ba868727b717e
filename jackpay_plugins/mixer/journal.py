"""The mixer's own durable journal: what the ledger must not say (who a deposit is for)
and what a restart must not redo differently (a round's shuffled notes, attempt numbers).

One JSON object per line, durable before the router acts on it: a deposit's intent is
written when the payment is admitted and fsync'd, together with every other intent of
that loop turn, just before the rows leave for the ledger (the router's `jackpay_flush`
barrier); a round's plan and a note's next attempt are fsync'd as they are written. The file is 0600: it links payers to payees. A torn last line (a crash during
the write, never acted on) is ignored; any other bad line stops the router's start with a
message naming the line.

Entries:
  {"e": "intent", "payer": P, "tx": T, "payee": Q, "amount": A}
  {"e": "round", "id": R, "amount": A, "at": t, "low": bool,
   "deposits": [[P, T], ...], "notes": [[Q, amount, P, T, refund], ...]}
  {"e": "attempt", "round": R, "note": I, "attempt": N, "refund": bool}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.files import load_json, write_all


class JournalCorrupt(ConfigError):
    """A journal line that is not the journal's (not a torn last line)."""


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._dirty = False

    def read(self) -> list[dict[str, Any]]:
        """Every entry, in order. Raises JournalCorrupt."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        lines = data.split(b"\n")
        for n, raw in enumerate(lines, 1):
            if not raw:
                continue
            last = n == len(lines)  # no newline after it: a torn write
            try:
                entry = load_json(raw)
                if not isinstance(entry, dict) or "e" not in entry:
                    raise ValueError("not a journal entry")
            except ValueError as exc:
                if last:
                    break
                raise JournalCorrupt(f"{self.path}: line {n}: {exc}") from None
            entries.append(entry)
        return entries

    def open(self) -> None:
        """Open for appending (0600), cutting a torn last line off first."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # also a journal left readable by others: it links payers to payees
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, size)
            good = data.rfind(b"\n") + 1
            if good < size:
                os.ftruncate(fd, good)
                os.fsync(fd)
        self._fd = fd

    def write(self, entry: dict[str, Any], *, sync: bool = True) -> None:
        """Append one entry; durably (fsync) unless `sync` is False, when `sync()` must
        run before anything depends on it. Raises OSError."""
        if self._fd < 0:
            self.open()
        data = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        write_all(self._fd, data)
        self._dirty = True
        if sync:
            self.sync()

    def sync(self) -> None:
        """fsync what was written since the last one (group commit). Raises OSError."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
