"""The frame codec: partial reads, many frames per chunk, oversize prefixes, garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import FrameTooLarge, ProtocolError
from common.framing import FrameDecoder, encode_frame


def test_one_frame_round_trip() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b"hello")) == [b"hello"]
    assert dec.buffered == 0


def test_byte_at_a_time() -> None:
    data = encode_frame(b"abc") + encode_frame(b"") + encode_frame(b"xyz" * 100)
    dec = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == [b"abc", b"", b"xyz" * 100]
    assert dec.buffered == 0


def test_many_frames_in_one_chunk_and_a_partial_tail() -> None:
    frames = [bytes([i]) * i for i in range(50)]
    data = b"".join(encode_frame(f) for f in frames)
    dec = FrameDecoder()
    assert dec.feed(data + encode_frame(b"tail")[:6]) == frames
    assert dec.buffered == 6
    assert dec.feed(b"il") == [b"tail"]


def test_oversize_prefix_refused_before_the_body_arrives() -> None:
    dec = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(struct.pack(">I", 1025))  # header only: no body was ever sent
    assert info.value.declared == 1025
    with pytest.raises(ProtocolError):
        dec.feed(b"more")


def test_limit_is_inclusive() -> None:
    dec = FrameDecoder(max_frame_bytes=8)
    assert dec.feed(encode_frame(b"12345678", 8)) == [b"12345678"]
    with pytest.raises(FrameTooLarge):
        encode_frame(b"123456789", 8)


def test_garbage_bytes_become_a_huge_length_and_are_refused() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(b"GET / HTTP/1.1\r\n\r\n")


@given(st.lists(st.binary(max_size=300), max_size=20), st.data())
def test_any_split_gives_back_the_same_frames(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    out: list[bytes] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        out += dec.feed(stream[prev:c])
        prev = c
    assert out == frames
