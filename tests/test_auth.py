"""Pure pieces of the security scheme: the login transcript and its signature, the
duplicate-key scanner, the limits, the TLS session over memory buffers."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from common.auth import login_transcript, sign_login, verify_login
from common.keys import raw_public
from common.limits import ConnectionCaps, FailedLogins, Throttle, TokenBucket
from common.strict import has_duplicate_keys

DOC = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()

# --- the login transcript ------------------------------------------------------------

VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
VECTOR = ("example", "router.example", b"\xaa" * 32, b"\xbb" * 32, "alice")
VECTOR_PUBLIC = "79b5562e8fe654f94078b112e8a98ba7901f853ae695bed7e0e3910bad049664"
VECTOR_SIG = ("f35ea836e4e6b62ed3399bf9f95c4a1bb6a39b05053b9e3497ef5a54283fda3b"
              "a84f49ae4acc064bc2a39a7926968704698dfab86748a2601a1575f88a0f6609")


def test_the_worked_example_in_the_protocol_doc_is_what_the_code_does() -> None:
    transcript = login_transcript(*VECTOR)
    assert len(transcript) == 129
    assert transcript.startswith(b"\x00\x00\x00\x0fjackpay-auth-v1\x00\x00\x00\x07example")
    assert raw_public(VECTOR_KEY.public_key()).hex() == VECTOR_PUBLIC
    assert sign_login(VECTOR_KEY, *VECTOR).hex() == VECTOR_SIG  # Ed25519 is deterministic
    flat_doc = DOC.replace("\n", "")
    assert VECTOR_PUBLIC in DOC
    assert VECTOR_SIG in flat_doc.replace(" ", "").replace("```", "")
    for field in ("6a61636b7061792d617574682d7631", "6578616d706c65", "726f757465722e6578616d706c65",
                  "616c696365"):
        assert field in DOC


def test_a_signature_is_good_for_exactly_one_session() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    args = ("net", "router.net", b"s" * 32, b"c" * 32, "alice")
    sig = sign_login(key, *args)
    assert verify_login(pub, sig, *args)
    for i, other in enumerate(("net2", "ledger.net", b"S" * 32, b"C" * 32, "bob")):
        changed = list(args)
        changed[i] = other
        assert not verify_login(pub, sig, *changed), f"field {i} is not bound"
    assert not verify_login(Ed25519PrivateKey.generate().public_key(), sig, *args)
    assert not verify_login(pub, bytes(64), *args)


def test_fields_cannot_run_into_each_other() -> None:
    """Length prefixes: moving bytes from one field to the next changes the transcript."""
    a = login_transcript("ab", "c.ab", b"s" * 32, b"c" * 32, "x")
    b = login_transcript("a", "bc.ab", b"s" * 32, b"c" * 32, "x")
    assert a != b


# --- duplicate keys ------------------------------------------------------------------

enc = msgspec.msgpack.encode


def raw_map(pairs: list[tuple[Any, bytes]]) -> bytes:
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(enc(k) + v for k, v in pairs)


@st.composite
def documents(draw: st.DrawFn, depth: int = 0) -> tuple[bytes, bool]:
    """(msgpack bytes, does any map in it repeat a key) — the truth known by building."""
    if depth >= 3 or draw(st.booleans()):
        value = draw(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=9),
                               st.binary(max_size=9), st.booleans(), st.floats()))
        return enc(value), False
    if draw(st.booleans()):
        items = [draw(documents(depth + 1)) for _ in range(draw(st.integers(0, 4)))]
        n = len(items)
        return bytes([0x90 | n]) + b"".join(b for b, _ in items), any(d for _, d in items)
    names = draw(st.lists(st.one_of(st.sampled_from(["t", "id", "amount", "to"]),
                                    st.integers(-3, 3)), max_size=6))
    children = [draw(documents(depth + 1)) for _ in names]
    dup = len(set(map(repr, names))) < len(names)
    return raw_map(list(zip(names, [b for b, _ in children], strict=True))), \
        dup or any(d for _, d in children)


@settings(max_examples=300, deadline=None)
@given(documents())
def test_duplicate_keys_are_found_at_any_depth(doc: tuple[bytes, bool]) -> None:
    data, has_dup = doc
    assert has_duplicate_keys(data) is has_dup


def test_the_same_key_written_two_ways_is_a_duplicate() -> None:
    assert has_duplicate_keys(b"\x82\xa1a\x01\xd9\x01a\x02")  # fixstr "a", str8 "a"
    assert has_duplicate_keys(b"\x82\x01\x00\xcc\x01\x00")  # fixint 1, uint8 1
    assert not has_duplicate_keys(b"\x82\xa1a\x01\xc4\x01a\x02")  # str "a" vs bin "a"


@given(st.binary(max_size=64))
def test_garbage_never_raises(data: bytes) -> None:
    assert has_duplicate_keys(data) in (True, False)


# --- limits ----------------------------------------------------------------------------


def test_connection_caps_count_per_address_and_in_total() -> None:
    caps = ConnectionCaps(max_total=3, max_per_address=2)
    assert caps.admit("a") is None
    assert caps.admit("a") is None
    assert "max_connections_per_address 2" in (caps.admit("a") or "")
    assert caps.admit("b") is None
    assert "max_connections 3" in (caps.admit("c") or "")
    caps.release("a")
    assert caps.admit("c") is None
    assert (caps.total, caps.open_from("a"), caps.open_from("c")) == (3, 1, 1)
    caps.release("zzz")  # never admitted: nothing changes
    assert caps.total == 3


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(20)) == 10  # one second's worth at once
    assert not bucket.take(0.05)
    assert bucket.take(0.1)  # 10/s: one token per 0.1 s
    assert sum(bucket.take(100.0) for _ in range(20)) == 10  # never more than the burst


def test_failed_logins_block_an_address_for_the_rest_of_its_window() -> None:
    failed = FailedLogins(limit=3, window_s=60)
    for t in (0, 1, 2):
        assert not failed.blocked("a", t)
        failed.record_failure("a", t)
    assert failed.blocked("a", 30)
    assert not failed.blocked("b", 30)
    assert not failed.blocked("a", 61)  # a new window
    bounded = FailedLogins(limit=1, max_addresses=2)
    for addr in ("x", "y", "z"):
        bounded.record_failure(addr, 0)
    assert not bounded.blocked("x", 1)  # the oldest was forgotten, memory stays bounded
    assert bounded.blocked("z", 1)


def test_throttle_counts_what_it_held_back() -> None:
    t = Throttle(1.0)
    assert t.allow(0.0) == 0
    assert t.allow(0.5) is None
    assert t.allow(0.9) is None
    assert t.allow(1.2) == 2


@pytest.mark.parametrize("code", ["auth_failed", "forbidden", "rate_limited"])
def test_new_codes_are_documented(code: str) -> None:
    assert f"`{code}`" in DOC


# --- key files -------------------------------------------------------------------------


def test_private_keys_must_be_the_users_own(tmp_path: Path) -> None:
    import os

    from common.keys import KeyFileError, check_private_file

    key = tmp_path / "alice.key"
    key.write_text("x")
    key.chmod(0o600)
    check_private_file(key)
    key.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        check_private_file(key)
    key.chmod(0o600)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(key, 4242, -1)
        with pytest.raises(KeyFileError, match="belongs to another user"):
            check_private_file(key)


def test_clients_are_counted_per_ipv4_address_and_per_ipv6_64() -> None:
    from common.limits import address_key

    assert address_key("127.0.0.1") == "127.0.0.1"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert address_key("not an address") == "not an address"
