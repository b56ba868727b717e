"""Random frames at the handshake of every server (hypothesis, bounded): no crash, no
traceback, no welcome for someone without a key, and the service keeps serving.

One real network for the module: ledger, router, a payer daemon (its control socket) and
the router's admin socket. Each example opens a fresh connection, sends a few frames —
random bytes, random maps (repeated keys included), and mutations of real handshake
frames that reach the later states (`challenge`, then a forged `auth`) — then one last
frame that ends the handshake either way, and reads everything the server answered.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netkit import Network

from common import PROTOCOL_VERSION
from common.framing import encode_frame
from common.tls import client_tls

pytestmark = pytest.mark.slow
EXAMPLES = 60
enc = msgspec.msgpack.encode

TYPES = ["hello", "auth", "pay", "ping", "append", "read", "stats", "balance", "history",
         "status", "receipt", "reject", "ack", "pong", "error", "welcome", "challenge",
         "inspect", "send", "watch", "offer", "settled", "nope"]
FIELDS = ["t", "id", "re", "version", "role", "peer", "nonce", "sig", "tx_id", "to", "amount",
          "memo", "from_seq", "limit", "party", "rows", "sender", "from", "code"]
ROLES = ["payer", "router", "admin", "cli", "client", "root"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=80),
    st.sampled_from(TYPES), st.sampled_from(ROLES), st.just(PROTOCOL_VERSION),
    st.sampled_from(["alice", "bob", "router", "_issuer", "mallory"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8)


def raw_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A msgpack map written pair by pair, so a key may repeat."""
    head = bytes([0x80 | len(pairs)]) if len(pairs) < 16 else b"\xde" + struct.pack(">H", len(pairs))
    return head + b"".join(enc(k) + enc(v) for k, v in pairs)


keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(-5, 5))
random_maps = st.lists(st.tuples(keys, values), max_size=9).map(raw_map)

HELLO = {"t": "hello", "id": 1, "version": PROTOCOL_VERSION, "role": "payer", "peer": "alice",
         "nonce": b"n" * 32}
AUTH = {"t": "auth", "id": 2, "sig": b"s" * 64}
LEDGER_HELLO = {"t": "hello", "id": 1, "version": PROTOCOL_VERSION, "role": "client",
                "peer": "x"}
APPEND = {"t": "append", "id": 3, "rows": [{"tx_id": "mint", "sender": "_issuer",
                                             "receiver": "bob", "amount": 10**9}]}


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """A real handshake frame with a few fields changed, dropped or repeated."""
    pairs = list(base.items())
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "repeat", "add"]))
        if action == "set" and pairs:
            i = draw(st.integers(0, len(pairs) - 1))
            pairs[i] = (pairs[i][0], draw(values))
        elif action == "drop" and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif action == "repeat" and pairs:
            k, _ = pairs[draw(st.integers(0, len(pairs) - 1))]
            pairs.append((k, draw(values)))
        else:
            pairs.append((draw(keys), draw(values)))
    return raw_map(pairs)


payloads = st.one_of(random_maps, st.binary(max_size=120), mutated(HELLO), mutated(AUTH),
                     mutated(LEDGER_HELLO), mutated(APPEND),
                     *(st.just(raw_map(list(m.items()))) for m in (HELLO, LEDGER_HELLO, APPEND)))
frames = st.one_of(payloads.map(lambda p: encode_frame(p, len(p))),  # well framed
                   st.binary(min_size=1, max_size=40))  # garbage, bad length prefixes


def read_frames(data: bytes) -> list[Any]:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + n:
            break
        out.append(msgspec.msgpack.decode(data[4:4 + n]))
        data = data[4 + n:]
    return out


async def exchange(open_conn: Any, sent: list[bytes], last: dict[str, Any]) -> list[Any]:
    """Send the frames and a last one; return the server's frames until it closes or
    answers the last one (id 999)."""
    reader, writer = await open_conn()
    try:
        writer.write(b"".join(sent) + encode_frame(enc(last)))
        data = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
                got = read_frames(data)
                if any(isinstance(f, dict) and f.get("re") == 999 for f in got):
                    break
        return read_frames(data)
    except (ConnectionError, OSError):
        return []  # refused at TLS, or reset: nothing for the attacker
    finally:
        writer.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    # Every example is a new connection from 127.0.0.1: lift the per-address rate of new
    # connections (tested on its own in test_security), or a fast machine runs into it
    # and the fuzz sees resets it did not cause.
    network = Network(Path(tmp_path_factory.mktemp("fuzz")) / "net",
                      participants={"alice": "100.00", "bob": "5.00"},
                      ledger_settings={"new_connections_per_address_per_s": 100_000.0},
                      router_settings={"new_connections_per_address_per_s": 100_000.0})
    network.start_ledger()
    network.start_router()
    network.start_payer("bob")
    yield network
    codes = network.stop_all()
    for name, proc in network.procs.items():
        log = proc.log_path.read_text(errors="replace")
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-3000:]}"
    assert all(c == 0 for c in codes.values()), codes


def check_still_serving(net: Network) -> None:
    async def pay() -> None:
        async with net.client("alice") as alice:
            await alice.send_payment("bob", 1)
    for proc in net.procs.values():
        assert proc.alive(), f"{proc.name} died"
    asyncio.run(pay())


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=4))
def test_router_handshake(net: Network, sent: list[bytes]) -> None:
    tls = net.router_tls()

    def open_conn() -> Any:
        return asyncio.open_connection(*net.procs["router"].addr, ssl=tls.context,
                                       server_hostname=tls.server_name)

    got = asyncio.run(exchange(open_conn, sent, {**AUTH, "id": 999}))
    types = [f.get("t") for f in got if isinstance(f, dict)]
    assert "welcome" not in types, got  # nobody without alice's key gets in
    assert set(types) <= {"error", "challenge"}, got
    assert net.procs["router"].alive()


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=4), plain=st.booleans())
def test_ledger_handshake_without_a_certificate(net: Network, sent: list[bytes],
                                                plain: bool) -> None:
    bare = client_tls(net.keys, "ledger")  # trusts the ledger, presents nothing

    def open_conn() -> Any:
        if plain:
            return asyncio.open_connection(*net.procs["ledger"].addr)
        return asyncio.open_connection(*net.procs["ledger"].addr, ssl=bare.context,
                                       server_hostname=bare.server_name)

    got = asyncio.run(exchange(open_conn, sent, {"t": "ping", "id": 999}))
    assert got == [], got  # no TLS, or no certificate: not one frame back
    assert net.procs["ledger"].alive()


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=4))
def test_ledger_handshake_as_an_auditor(net: Network, sent: list[bytes]) -> None:
    """An auditor's certificate may read, never append nor be welcomed as the router."""
    tls = net.ledger_tls("auditor")
    rows_before = net.ledger_path.read_bytes()

    def open_conn() -> Any:
        return asyncio.open_connection(*net.procs["ledger"].addr, ssl=tls.context,
                                       server_hostname=tls.server_name)

    got = asyncio.run(exchange(open_conn, sent, {"t": "ping", "id": 999}))
    assert not [f for f in got if isinstance(f, dict) and f.get("t") == "appended"], got
    assert net.ledger_path.read_bytes() == rows_before
    assert net.procs["ledger"].alive()


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=4))
def test_local_sockets_survive_garbage(net: Network, sent: list[bytes]) -> None:
    """The daemon's control socket and the router's admin socket: owner-only files, so a
    hello is welcome there; garbage must not crash them."""
    for path in (str(net.config.control_socket("bob")), net.admin_path):
        def open_conn(p: str = path) -> Any:
            return asyncio.open_unix_connection(p)

        got = asyncio.run(exchange(open_conn, sent, {"t": "ping", "id": 999}))
        # an answer of some kind (welcome, error, pong), or a close: never a crash
        assert all(isinstance(f, dict) and "t" in f for f in got), got
    assert net.procs["router"].alive()
    assert net.procs["bob"].alive()


def test_everyone_is_still_served_after_the_fuzzing(net: Network) -> None:
    check_still_serving(net)
