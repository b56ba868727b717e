"""Duplicate keys in a msgpack map: a frame that says `amount` twice is refused.

msgspec, like most decoders, keeps the last value of a repeated key, so a frame could
show one amount to a checker that reads the first and another to the router. The
`Channel` refuses such frames (`bad_request`) in two steps:

1. fast: a frame whose bytes equal the re-encoding of what it decoded to has no
   duplicate key (the canonical encoding has none). Every JackPay encoder writes
   canonical frames, so this is the only check they ever pay (one encode + compare);
2. exact: any other frame is walked by `has_duplicate_keys`, a small iterative msgpack
   scanner that compares map keys by value (a key written as fixstr and again as str8
   is still a duplicate).

Pure: bytes in, a bool out. Malformed input is not this module's business (the strict
decoder already accepted the frame); the scanner stops quietly at a truncation.
"""

from __future__ import annotations

import struct

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_FIXED = {  # type byte -> payload bytes after it, for scalars of fixed size
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}


class _Truncated(Exception):
    pass


def _length(data: bytes, pos: int, size: int) -> tuple[int, int]:
    if pos + size > len(data):
        raise _Truncated
    if size == 1:
        return data[pos], pos + 1
    if size == 2:
        return _U16(data, pos)[0], pos + 2
    return _U32(data, pos)[0], pos + 4


def _header(data: bytes, pos: int) -> tuple[str, int, int, int]:
    """One item's header at `pos`: (kind, count or byte length, start of its body, end
    of its whole encoding for scalars / start of children for containers)."""
    if pos >= len(data):
        raise _Truncated
    b = data[pos]
    pos += 1
    if b <= 0x7F or b >= 0xE0:
        return "int", 0, pos - 1, pos
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F, pos, pos
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F, pos, pos
    if 0xA0 <= b <= 0xBF:
        n = b & 0x1F
        return "str", n, pos, pos + n
    if b in (0xD9, 0xDA, 0xDB):
        n, pos = _length(data, pos, 1 << (b - 0xD9))
        return "str", n, pos, pos + n
    if b in (0xC4, 0xC5, 0xC6):
        n, pos = _length(data, pos, 1 << (b - 0xC4))
        return "bin", n, pos, pos + n
    if b in (0xC7, 0xC8, 0xC9):
        n, pos = _length(data, pos, 1 << (b - 0xC7))
        return "ext", n, pos - 1, pos + 1 + n
    if b in (0xDC, 0xDD):
        n, pos = _length(data, pos, 2 if b == 0xDC else 4)
        return "array", n, pos, pos
    if b in (0xDE, 0xDF):
        n, pos = _length(data, pos, 2 if b == 0xDE else 4)
        return "map", n, pos, pos
    size = _FIXED.get(b)
    if size is None:  # 0xC1 is never used
        raise _Truncated
    return "int" if 0xCC <= b <= 0xD3 else "scalar", 0, pos - 1, pos + size


def _key(data: bytes, kind: str, start: int, end: int) -> tuple[str, object]:
    """A map key's identity by value: text by its bytes, integers by their value."""
    if kind == "str":
        return ("s", data[start:end])
    if kind == "int":
        b = data[start]
        if b <= 0x7F:
            return ("i", b)
        if b >= 0xE0:
            return ("i", b - 0x100)
        signed = b >= 0xD0
        return ("i", int.from_bytes(data[start + 1:end], "big", signed=signed))
    return (kind, data[start:end])


def has_duplicate_keys(data: bytes) -> bool:
    """True if any map in the msgpack `data` (nested ones included) repeats a key."""
    # Work list: for each open container, how many items are still to read and, for a
    # map, the keys seen so far and whether the next item is a key.
    stack: list[list[object]] = []
    pos = 0
    try:
        while True:
            if stack and stack[-1][0] == 0:
                stack.pop()
                if not stack:
                    return False
                continue
            kind, n, start, after = _header(data, pos)
            is_key = False
            if stack:
                top = stack[-1]
                top[0] = int(top[0]) - 1  # type: ignore[call-overload]
                if top[1] is not None:  # a map: items alternate key, value
                    is_key = bool(top[2])
                    top[2] = not is_key
            if kind in ("map", "array"):
                # (A container used as a map key is not compared: JackPay has none.)
                stack.append([n * 2 if kind == "map" else n,
                              set() if kind == "map" else None, True])
                pos = after
                continue
            if after > len(data):
                raise _Truncated
            if is_key:
                seen = stack[-1][1]
                assert isinstance(seen, set)
                ident = _key(data, kind, start, after)
                if ident in seen:
                    return True
                seen.add(ident)
            pos = after
            if not stack:
                return False
    except _Truncated:
        return False
