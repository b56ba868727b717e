"""Text from other people (memos, names, reasons) on an operator's or payer's terminal.

What may not reach a terminal raw: C0 and C1 control characters and DEL (a newline fakes
an extra output line, ESC recolours or moves the cursor), the Unicode line and paragraph
separators, and the bidirectional overrides and isolates (they reorder what follows on
the line). `printable` escapes them; `has_control` says whether a new value holds any
(participant names are refused with them)."""

from __future__ import annotations

import re

CONTROL_CLASS = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069"
_CONTROL = re.compile(f"[{CONTROL_CLASS}]")


def printable(text: str) -> str:
    """`text` with every character above escaped (`\\x1b`, `\\u202e`)."""
    return _CONTROL.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                   else f"\\u{ord(m.group()):04x}"), text)


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None
