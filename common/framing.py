"""The frame codec: a 4-byte big-endian length, then that many bytes of payload.

Pure (sans-I/O), in the manner of h11: bytes go in with `FrameDecoder.feed`, whole
payloads come out; `encode_frame` returns bytes instead of writing them. The declared
length is checked against the limit as soon as the 4 header bytes are in, before any of
the body is buffered, so a hostile length prefix costs nothing.
"""

from __future__ import annotations

import struct

from common.errors import FrameTooLarge, ProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 64 * 1024


def encode_frame(payload: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Prefix `payload` with its length. Raises FrameTooLarge if it exceeds the limit."""
    if len(payload) > max_frame_bytes:
        raise FrameTooLarge(len(payload), max_frame_bytes)
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Reassembles frames from arbitrary chunks (one byte at a time, or many frames at once).

    After `feed` raises FrameTooLarge the decoder is poisoned: the stream has lost its
    framing and the connection must be closed.
    """

    __slots__ = ("_broken", "_buf", "_pos", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every payload now complete, in order."""
        if self._broken:
            raise ProtocolError("frame decoder used after a framing error")
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = self._pos
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self.max_frame_bytes:
                self._broken = True
                raise FrameTooLarge(length, self.max_frame_bytes)
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            out.append(bytes(buf[start : start + length]))
            pos = start + length
        if pos == end:
            buf.clear()
            pos = 0
        elif pos > 65536:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf) - self._pos
