"""Every refusal of SECURITY.md with real processes: the attacker gets nothing (no welcome,
no row, no money moved, no data) and everyone else keeps being served.

Attacks on the router's login: a stranger's key, a replayed signature, a signature for
another server or network, alice's key for bob's id, a frame before login. On the links:
plain TCP to a TLS port, a certificate from another CA (both directions), an anonymous
read and a non-router append at the ledger, a frame with a duplicate key. On the bounds:
a connection that never completes its handshake, 2,000 connections from one address,
failed logins per address, a payer's rate and payments in flight. And key rotation.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from netkit import Network

from common import PROTOCOL_VERSION
from common.aio import Channel, open_channel
from common.auth import new_nonce, sign_login
from common.errors import ConnectionLost, ErrorCode, RequestFailed
from common.framing import encode_frame
from common.keygen import ensure_keys, rotate
from common.messages import (
    PAYER_INBOUND,
    Append,
    Auth,
    Challenge,
    Error,
    GetBalance,
    Hello,
    Message,
    Paid,
    Ping,
    Pong,
    Read,
    RowIn,
    Rows,
    Welcome,
    decoder_for,
)
from common.procs import Proc, python_module
from common.tls import ClientTls, TlsFailed, client_tls
from payer_client.client import PayerClient, PayerCredentials

INBOUND = decoder_for(PAYER_INBOUND)


# --- helpers -------------------------------------------------------------------------


def up(net: Network, **router_settings: Any) -> None:
    net.participants.update({"alice": "100.00", "bob": "5.00"})
    net.router_settings.update(router_settings)
    net.write_config()
    net.start_ledger()
    net.start_router()


async def raw_router(net: Network, *, local: str | None = None) -> Channel:
    """A TLS connection to the router that has said nothing yet (an attacker's start:
    the network CA is public)."""
    return await open_channel(*net.procs["router"].addr, INBOUND, name="attacker",
                              tls=net.router_tls(),
                              local_addr=(local, 0) if local is not None else None)


async def login(ch: Channel, payer: str, key: Ed25519PrivateKey, *, network_id: str = "testnet",
                server_id: str = "router.testnet", client_nonce: bytes | None = None,
                sig: bytes | None = None) -> tuple[Message, bytes, bytes]:
    """hello → challenge → auth by hand. Returns (the answer to auth, client nonce, sig)."""
    nonce = client_nonce or new_nonce()
    challenge = await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer", peer=payer,
                                       nonce=nonce), timeout=5)
    assert isinstance(challenge, Challenge)
    assert challenge.server == "router.testnet"
    if sig is None:
        sig = sign_login(key, network_id, server_id, challenge.nonce, nonce, payer)
    try:
        answer: Message = await ch.request(Auth(id=0, sig=sig), timeout=5)
    except RequestFailed as exc:
        answer = Error(re=None, code=str(exc.code), message=exc.message)
    return answer, nonce, sig


async def assert_refused_and_closed(ch: Channel, answer: Message,
                                    code: str = "auth_failed") -> None:
    assert isinstance(answer, Error), answer
    assert answer.code == code
    assert answer.message == "authentication failed" or code != "auth_failed"
    await asyncio.wait_for(ch.wait_closed(), 5)


async def assert_others_served(net: Network, *, tx_id: str) -> None:
    """alice still pays bob (and so is still who she was), with her own key."""
    async with net.client("bob"), net.client("alice") as alice:
        paid = await alice.send_payment("bob", 100, tx_id=tx_id)
        assert isinstance(paid, Paid)


def no_tracebacks(net: Network) -> None:
    for name, proc in net.procs.items():
        text = proc.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"


def ledger_text(net: Network) -> str:
    return net.ledger_path.read_text()


def other_network_keys(tmp_path: Path) -> Network:
    """Keys of an impostor network with the same id and names but its own CA."""
    fake = Network(tmp_path / "impostor", participants={"alice": "1.00"})
    ensure_keys(fake.config)
    return fake


# --- logging in ----------------------------------------------------------------------


async def test_hello_as_alice_with_a_strangers_key_gets_nothing(network: Network) -> None:
    up(network)
    before = ledger_text(network)
    ch = await raw_router(network)
    answer, _, _ = await login(ch, "alice", Ed25519PrivateKey.generate())
    await assert_refused_and_closed(ch, answer)
    with pytest.raises(ConnectionLost):
        await ch.request(GetBalance(id=0), timeout=2)
    assert ledger_text(network) == before
    # the same through the importable client: auth_failed, nothing sent
    stranger = network.client("alice")
    assert stranger.credentials is not None
    stranger.credentials = PayerCredentials("testnet", Ed25519PrivateKey.generate(),
                                            stranger.credentials.tls)
    with pytest.raises(RequestFailed) as info:
        await stranger.connect()
    assert info.value.code == ErrorCode.AUTH_FAILED
    await assert_others_served(network, tx_id="after-stranger")
    assert (await network.inspect()).refused_logins == 2  # the operator sees them
    log = network.procs["router"].log_path.read_text()
    assert "login refused" in log
    assert "signature does not verify with alice's key" in log  # the reason: in the log only
    no_tracebacks(network)


async def test_a_replayed_login_is_refused(network: Network) -> None:
    up(network)
    alice_key = network.keys.load_payer_key("alice")
    first = await raw_router(network)
    answer, nonce, sig = await login(first, "alice", alice_key)
    assert isinstance(answer, Welcome)  # a real login, recorded on the wire
    await first.aclose()
    replay = await raw_router(network)  # same client nonce, same signature, new session
    answer, _, _ = await login(replay, "alice", alice_key, client_nonce=nonce, sig=sig)
    await assert_refused_and_closed(replay, answer)
    await assert_others_served(network, tx_id="after-replay")


@pytest.mark.parametrize(("network_id", "server_id"), [
    ("testnet", "ledger.testnet"),     # a signature made for another server
    ("testnet", "router.othernet"),    # ... for another network's router
    ("othernet", "router.testnet"),    # ... for another network id
])
async def test_a_signature_for_another_server_or_network_is_refused(
        network: Network, network_id: str, server_id: str) -> None:
    up(network)
    ch = await raw_router(network)
    answer, _, _ = await login(ch, "alice", network.keys.load_payer_key("alice"),
                               network_id=network_id, server_id=server_id)
    await assert_refused_and_closed(ch, answer)
    await assert_others_served(network, tx_id="after-other-server")


async def test_a_valid_key_for_the_wrong_id_is_refused(network: Network) -> None:
    up(network)
    alice_key = network.keys.load_payer_key("alice")
    for claimed in ("bob", "mallory", "_issuer"):  # a participant, a stranger, an account
        ch = await raw_router(network)
        answer, _, _ = await login(ch, claimed, alice_key)
        await assert_refused_and_closed(ch, answer)
    log = network.procs["router"].log_path.read_text()
    assert "'mallory' is not a participant with a key" in log
    await assert_others_served(network, tx_id="after-wrong-id")


async def test_only_the_handshake_is_accepted_before_login(network: Network) -> None:
    up(network)
    ch = await raw_router(network)
    challenge = await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer",
                                       peer="alice", nonce=new_nonce()), timeout=5)
    assert isinstance(challenge, Challenge)
    with pytest.raises(RequestFailed) as info:  # a request instead of `auth`
        await ch.request(GetBalance(id=0), timeout=5)
    assert info.value.code == ErrorCode.AUTH_FAILED
    await asyncio.wait_for(ch.wait_closed(), 5)
    # a frame larger than a handshake ever is, before login: frame_too_large, closed
    ch = await raw_router(network)
    ch.send_raw(encode_frame(msgspec.msgpack.encode({"t": "hello", "pad": "x" * 5000}), 10**6))
    await asyncio.wait_for(ch.wait_closed(), 5)
    await assert_others_served(network, tx_id="after-early-frames")


async def test_a_replacement_session_needs_alices_key(network: Network) -> None:
    up(network)
    async with network.client("alice") as alice:
        ch = await raw_router(network)
        answer, _, _ = await login(ch, "alice", Ed25519PrivateKey.generate())
        await assert_refused_and_closed(ch, answer)
        assert alice.connected  # the real session was not replaced
        assert await alice.test_router_link() > 0


# --- the links -------------------------------------------------------------------------


def plain_exchange(addr: tuple[str, int], frame: bytes) -> bytes:
    """Send `frame` over plain TCP; everything the server sends back before closing."""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(frame)
        s.settimeout(3)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (TimeoutError, ConnectionError):
            pass
    return data


async def test_plaintext_to_a_tls_port_is_closed_without_a_word(network: Network) -> None:
    up(network)
    hello = encode_frame(msgspec.msgpack.encode(
        {"t": "hello", "id": 1, "version": PROTOCOL_VERSION, "role": "router", "peer": "router"}))
    for name in ("router", "ledger"):
        got = await asyncio.to_thread(plain_exchange, network.procs[name].addr, hello)
        assert not got.startswith(b"\x00"), f"{name} answered a plaintext frame: {got!r}"
    await assert_others_served(network, tx_id="after-plaintext")
    no_tracebacks(network)
    assert "TLS failed" in network.procs["router"].log_path.read_text()


async def test_a_router_with_another_ca_is_not_trusted(network: Network, tmp_path: Path) -> None:
    """Pinning: a payer reaching a server whose certificate another CA signed (same
    network id, same names) refuses it before sending anything."""
    up(network)
    impostor = other_network_keys(tmp_path)
    client = PayerClient(*network.procs["router"].addr, "alice", credentials=PayerCredentials(
        "testnet", network.keys.load_payer_key("alice"), client_tls(impostor.keys, "router")))
    with pytest.raises(TlsFailed, match="certificate was refused"):
        await client.connect()


async def test_a_client_certificate_from_another_ca_gets_nothing_at_the_ledger(
        network: Network, tmp_path: Path) -> None:
    up(network)
    before = ledger_text(network)
    impostor = other_network_keys(tmp_path)
    # trusts the real ledger, presents the impostor CA's router certificate
    forged = client_tls(network.keys, "ledger")
    forged.context.load_cert_chain(impostor.keys.cert("router-client"),
                                   impostor.keys.key("router-client"))
    anonymous = client_tls(network.keys, "ledger")  # no certificate at all

    async def mint(tls: ClientTls) -> None:
        ch = await open_channel(*network.procs["ledger"].addr,
                                decoder_for((Welcome, Rows, Error)), name="forger", tls=tls)
        await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="router", peer="router"),
                         timeout=5)
        await ch.request(Append(id=0, rows=[RowIn(tx_id="mint", sender="_issuer",
                                                  receiver="bob", amount=10**9)]), timeout=5)

    for tls in (forged, anonymous):
        with pytest.raises((ConnectionLost, TlsFailed, OSError)):
            await mint(tls)
    assert ledger_text(network) == before
    await assert_others_served(network, tx_id="after-forged-cert")
    no_tracebacks(network)


async def test_only_the_router_appends_and_auditors_only_read(network: Network) -> None:
    up(network)
    before = ledger_text(network)
    mint = Append(id=0, rows=[RowIn(tx_id="mint", sender="_issuer", receiver="bob",
                                    amount=10**9)])
    # the auditor's certificate saying hello as the router: refused at hello
    ch = await open_channel(*network.procs["ledger"].addr, decoder_for((Welcome, Rows, Error)),
                            name="auditor", tls=network.ledger_tls("auditor"))
    with pytest.raises(RequestFailed) as info:
        await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="router", peer="router"),
                         timeout=5)
    assert info.value.code == ErrorCode.AUTH_FAILED
    await asyncio.wait_for(ch.wait_closed(), 5)
    # ... as a client: may read, may not append
    auditor = await network.ledger_channel(identity="auditor", role="client")
    rows = await auditor.request(Read(id=0), timeout=5)
    assert isinstance(rows, Rows)
    assert len(rows.rows) == 2  # the two openings
    with pytest.raises(RequestFailed) as info:
        await auditor.request(mint, timeout=5)
    assert info.value.code == ErrorCode.FORBIDDEN
    assert isinstance(await auditor.request(Ping(id=0), timeout=5), Pong)  # still served
    await auditor.aclose()
    assert ledger_text(network) == before
    await assert_others_served(network, tx_id="after-auditor-append")


async def test_an_anonymous_ledger_read_gets_nothing(network: Network) -> None:
    up(network)
    read = encode_frame(msgspec.msgpack.encode({"t": "hello", "id": 1, "version": PROTOCOL_VERSION,
                                                "role": "client"}))
    read += encode_frame(msgspec.msgpack.encode({"t": "read", "id": 2}))
    # plain TCP
    got = await asyncio.to_thread(plain_exchange, network.procs["ledger"].addr, read)
    assert b"alice" not in got
    assert not got.startswith(b"\x00")
    # Refusals of one kind are logged once a second (common.logs.ThrottledEvents): let
    # the window pass, or this one's reason is only counted in the next line.
    await asyncio.sleep(1.1)
    # TLS that trusts the ledger, without a client certificate
    tls = client_tls(network.keys, "ledger")

    def tls_exchange() -> bytes:
        with socket.create_connection(network.procs["ledger"].addr, timeout=5) as raw, \
                tls.context.wrap_socket(raw, server_hostname=tls.server_name) as s:
            data = b""
            try:
                s.sendall(read)
                s.settimeout(3)
                while chunk := s.recv(4096):
                    data += chunk
            except (TimeoutError, ssl.SSLError, ConnectionError):
                pass
            return data

    assert await asyncio.to_thread(tls_exchange) == b""
    log = network.procs["ledger"].log_path
    for _ in range(100):  # the ledger logs the refusal once it has seen the handshake fail
        if "the client sent no certificate" in log.read_text():
            break
        await asyncio.sleep(0.05)
    assert "the client sent no certificate" in log.read_text()
    no_tracebacks(network)


async def test_a_frame_with_a_duplicate_key_is_refused(network: Network) -> None:
    up(network)
    errors: list[Error] = []
    async with network.client("bob"), network.client("alice", on_error=errors.append) as alice:
        ch = alice._channel
        assert ch is not None
        e = msgspec.msgpack.encode
        # pay 0.01 … or 500.00: the router must not pick one
        payload = (b"\x86" + e("t") + e("pay") + e("id") + e(77) + e("tx_id") + e("dup-1")
                   + e("to") + e("bob") + e("amount") + e(1) + e("amount") + e(50000))
        ch.send_raw(encode_frame(payload))
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
        assert [(x.re, x.code) for x in errors] == [(77, "bad_request")]
        assert "repeats a key" in errors[0].message
        assert (await alice.status("dup-1")).state == "unknown"
        assert (await alice.query_balance()).balance == 10_000
        assert isinstance(await alice.send_payment("bob", 100), Paid)  # the session goes on
    assert "dup-1" not in ledger_text(network)


# --- bounds --------------------------------------------------------------------------


async def wait_closed_by_peer(sock: socket.socket, within_s: float) -> float:
    """Seconds until the server closed `sock` (which sent nothing), or fail."""
    start = time.monotonic()
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within_s):
            while True:
                try:
                    if await loop.sock_recv(sock, 4096) == b"":
                        break
                except ConnectionError:
                    break
    finally:
        sock.close()
    return time.monotonic() - start


async def test_a_connection_that_never_completes_its_handshake_is_closed_in_time(
        network: Network) -> None:
    network.ledger_settings["handshake_timeout_s"] = 1.0
    up(network, handshake_timeout_s=1.0)
    # silent TCP: no TLS at all, at the router and at the ledger
    for name in ("router", "ledger"):
        sock = socket.create_connection(network.procs[name].addr)
        took = await wait_closed_by_peer(sock, within_s=6)
        assert took >= 0.5, f"{name} closed a silent connection before its deadline"
    # TLS done, then silence (no hello), and hello but no auth
    ch = await raw_router(network)
    await asyncio.wait_for(ch.wait_closed(), 6)
    ch = await raw_router(network)
    assert isinstance(await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer",
                                             peer="alice", nonce=new_nonce()), timeout=5),
                      Challenge)
    await asyncio.wait_for(ch.wait_closed(), 6)
    lch = await open_channel(*network.procs["ledger"].addr, decoder_for((Welcome, Error)),
                             name="silent", tls=network.ledger_tls("auditor"))
    await asyncio.wait_for(lch.wait_closed(), 6)
    # a logged-in session is not bound by it
    async with network.client("alice") as alice:
        await asyncio.sleep(1.5)
        assert alice.connected
        assert await alice.test_router_link() > 0
    no_tracebacks(network)


@pytest.mark.slow
async def test_2000_connections_from_one_address_are_capped(network: Network) -> None:
    up(network)  # default caps: 1024 per address at the router
    addr = network.procs["router"].addr
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for _ in range(2000):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, addr)
            socks.append(s)
        await asyncio.sleep(1.0)  # the router has accepted (or refused) them all

        def closed(s: socket.socket) -> bool:
            try:
                return s.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        still_open = 2000 - sum(closed(s) for s in socks)
        # refused beyond the new-connection rate, or dropped (oldest first) beyond the
        # 512 connections that may be in their handshake at once
        assert 0 < still_open <= 512, still_open
        # alice and bob, from another loopback address, still log in and pay
        other = ("127.0.0.2", 0)
        async with network.client("bob", local_addr=other), \
                network.client("alice", local_addr=other) as alice:
            assert isinstance(await alice.send_payment("bob", 100, tx_id="from-127.0.0.2"),
                              Paid)
        ch = await raw_router(network, local="127.0.0.2")
        answer, _, _ = await login(ch, "alice", network.keys.load_payer_key("alice"))
        assert isinstance(answer, Welcome)
        await ch.aclose()
    finally:
        for s in socks:
            s.close()
    log = network.procs["router"].log_path.read_text()
    assert ("new connections a second from 127.0.0.1" in log
            or "dropped a connection still in its handshake" in log), log[-2000:]
    assert len(log.splitlines()) < 100  # refusals are logged at most once a second
    no_tracebacks(network)


async def test_failed_logins_are_limited_per_address(network: Network) -> None:
    up(network, failed_logins_per_minute=3)
    alice_key = network.keys.load_payer_key("alice")
    for _ in range(3):
        ch = await raw_router(network)
        answer, _, _ = await login(ch, "alice", Ed25519PrivateKey.generate())
        await assert_refused_and_closed(ch, answer)
    # from the same address even the right key is refused now, before any signature check
    ch = await raw_router(network)
    with pytest.raises(RequestFailed) as info:
        await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer", peer="alice",
                               nonce=new_nonce()), timeout=5)
    assert info.value.code == ErrorCode.RATE_LIMITED
    # ... every one of its hellos: refused and counted, but not a log line each
    for _ in range(20):
        ch = await raw_router(network)
        with pytest.raises(RequestFailed):
            await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="payer",
                                   peer="alice", nonce=new_nonce()), timeout=5)
    assert (await network.inspect()).refused_logins == 3 + 1 + 20
    log = network.procs["router"].log_path.read_text()
    assert sum("login refused" in ln and "code=rate_limited" in ln
               for ln in log.splitlines()) <= 2
    # another address is not affected
    ch = await raw_router(network, local="127.0.0.3")
    answer, _, _ = await login(ch, "alice", alice_key)
    assert isinstance(answer, Welcome)
    await ch.aclose()


async def test_a_payers_rate_and_payments_in_flight_are_capped(network: Network) -> None:
    up(network, payer_requests_per_s=20.0, payer_max_in_flight=2)
    release = asyncio.Event()

    async def slow(offer: object) -> None:
        await release.wait()

    async with network.client("bob", on_offer=slow), network.client("alice") as alice:
        # two payments in flight at once; the third is rate_limited and leaves no trace
        first = [asyncio.create_task(alice.send_payment("bob", 100, tx_id=f"slow-{i}"))
                 for i in range(2)]
        await asyncio.sleep(0.3)
        with pytest.raises(RequestFailed) as info:
            await alice.send_payment("bob", 100, tx_id="third")
        assert info.value.code == ErrorCode.RATE_LIMITED
        assert info.value.retriable
        assert (await alice.status("third")).state == "unknown"
        release.set()
        await asyncio.gather(*first)
        await asyncio.sleep(1.0)  # the bucket refills
        assert isinstance(await alice.send_payment("bob", 100, tx_id="third"), Paid)
        # a burst of requests above the rate: some are rate_limited, then it recovers
        codes = await asyncio.gather(*(alice.test_router_link() for _ in range(60)),
                                     return_exceptions=True)
        limited = [c for c in codes if isinstance(c, RequestFailed)]
        assert limited
        assert all(c.code == ErrorCode.RATE_LIMITED for c in limited)
        await asyncio.sleep(1.1)
        assert await alice.test_router_link() > 0


async def test_a_rotated_key_replaces_the_old_one_at_once(network: Network) -> None:
    """`jackpay-keys --rotate alice` while alice's daemon is logged in: the router drops
    the session proven with the old key, refuses the old key from then on, and the daemon
    logs in again with the new one and pays."""
    up(network)
    network.start_payer("bob")
    network.start_payer("alice")
    old_key = network.keys.load_payer_key("alice")
    lines = rotate(network.config, ["alice"])
    assert any("payers/alice.key" in line for line in lines)
    ch = await raw_router(network)
    answer, _, _ = await login(ch, "alice", old_key)
    await assert_refused_and_closed(ch, answer)
    for _ in range(100):  # the daemon notices, and logs in with the new key
        log = network.procs["alice"].log_path.read_text()
        if log.count("connected router=") >= 2:
            break
        await asyncio.sleep(0.1)
    assert "key changed; session closed" in network.procs["router"].log_path.read_text()
    sent = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "payer_client", "send", "bob", "1.00",
                         "--config", str(network.config_path), "--id", "alice"],
        capture_output=True, text=True, env=network.env(), timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    assert "paid 1.00 to bob" in sent.stdout


# --- found by review: each of these failed before its fix ----------------------------


async def test_a_bad_frame_before_login_ends_the_connection(network: Network) -> None:
    """Before login one error and close, not an answer (and a log line) per frame; a
    frame nested deep enough to make a decoder recurse is just a bad frame."""
    up(network)
    deep = b"\x91" * 1015 + b"\xc0"  # 1015 nested arrays, inside the 1 KiB pre-login limit
    for payload in (b"\xc1" * 5, deep, msgspec.msgpack.encode(
            {"t": "x\n09:00:00.000 info    jackpay.router.payments: payment outcome=paid",
             "id": 1})):
        ch = await raw_router(network)
        errors: list[Message] = []
        ch.on_message = lambda c, m, seen=errors: seen.append(m)  # type: ignore[misc]
        ch.send_raw(encode_frame(payload) * 50)
        await asyncio.wait_for(ch.wait_closed(), 5)
        assert len(errors) <= 1, errors
    log = network.procs["router"].log_path.read_text()
    assert not [ln for ln in log.splitlines() if ln.startswith("09:00:00.000")], log
    assert log.count("bad frame from") <= 3
    await assert_others_served(network, tx_id="after-bad-frames")
    no_tracebacks(network)


async def test_idle_connections_cannot_lock_the_router_out_of_its_ledger(
        network: Network) -> None:
    """Silent sockets fill the ledger's caps; the oldest one still in its handshake is
    dropped for a new connection, so the router (and an auditor) still get in."""
    network.ledger_settings.update(max_connections=20, max_connections_per_address=20,
                                   max_handshaking=10)
    up(network)
    addr = network.procs["ledger"].addr
    silent = []
    for i in range(30):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 3}", 0))
        s.connect(addr)
        silent.append(s)
    await asyncio.sleep(0.3)
    auditor = await network.ledger_channel(identity="auditor", role="client")
    assert isinstance(await auditor.request(Ping(id=0), timeout=5), Pong)
    await auditor.aclose()
    network.procs["router"].kill()  # the router must come back in through them too
    await asyncio.to_thread(network.restart, "router")
    await assert_others_served(network, tx_id="after-idle-sockets")
    for s in silent:
        s.close()
    log = network.procs["ledger"].log_path.read_text()
    assert "dropped a connection still in its handshake" in log


async def test_new_connections_per_address_are_limited(network: Network) -> None:
    up(network, new_connections_per_address_per_s=4.0)  # a burst of 20
    addr = network.procs["router"].addr
    flood = []
    for _ in range(40):
        s = socket.socket()
        s.bind(("127.0.0.4", 0))
        s.connect(addr)
        flood.append(s)
    await asyncio.sleep(0.3)
    closed = 0
    for s in flood:
        s.setblocking(False)
        try:
            closed += s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    assert closed >= 15, closed  # refused before any TLS work
    await assert_others_served(network, tx_id="after-connection-flood")


async def test_every_frame_after_login_is_paid_for(network: Network) -> None:
    """Errors sent unasked and late replies cost a token like requests; a history page
    costs 20."""
    up(network, payer_requests_per_s=20.0)
    async with network.client("alice") as alice:
        ch = alice._channel
        assert ch is not None
        for _ in range(40):
            ch.send_nowait(Error(re=None, code="x" * 1000, message="y" * 5000))
        with pytest.raises(RequestFailed) as info:
            await alice.test_router_link()
        assert info.value.code == ErrorCode.RATE_LIMITED
        await asyncio.sleep(1.1)  # a full bucket again: 20 tokens
        await alice.history()
        with pytest.raises(RequestFailed) as info:
            await alice.test_router_link()
        assert info.value.code == ErrorCode.RATE_LIMITED
    log = network.procs["router"].log_path.read_text()
    assert "y" * 201 not in log  # what a payer sends is cut short in the log


async def test_a_key_copied_over_in_place_or_unusable_is_in_force_at_once(
        network: Network) -> None:
    up(network)
    keys = network.keys
    old_key = keys.load_payer_key("alice")
    async with network.client("alice") as alice_old:
        # `cp new.pub alice.pub`: the folder does not change, the file does
        new = Ed25519PrivateKey.generate()
        from common.keys import public_pem
        keys.payer_public("alice").write_bytes(public_pem(new.public_key()))
        ch = await raw_router(network)
        answer, _, _ = await login(ch, "alice", old_key)
        await assert_refused_and_closed(ch, answer)
        await asyncio.wait_for(alice_old.wait_closed(), 5)  # the old session goes too
    ch = await raw_router(network)
    assert isinstance((await login(ch, "alice", new))[0], Welcome)
    await ch.aclose()
    # a file that is not a key: nobody logs in as alice (not "the old key stays")
    keys.payer_public("alice").write_text("-----BEGIN PUBLIC KEY-----\nnonsense\n")
    ch = await raw_router(network)
    answer, _, _ = await login(ch, "alice", new)
    await assert_refused_and_closed(ch, answer)
    no_tracebacks(network)


def test_the_plain_mode_needs_its_whole_flag_and_loopback(network: Network) -> None:
    network.participants.update({"alice": "1.00"})
    network.write_config()
    for argv, why in (
            (["router", "--config", str(network.config_path), "--plain"], "unrecognized"),
            (["ledger", "--config", str(network.config_path), "--plain"], "unrecognized"),
            (["ledger", "--config", str(network.config_path), "--plain-benchmark-only",
              "--host", "0.0.0.0"], "loopback address only"),
            (["router", "--config", str(network.config_path), "--plain-benchmark-only",
              "--host", "0.0.0.0"], "loopback address only")):
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                              env=network.env(), timeout=30, check=False)
        assert proc.returncode == 2, proc
        assert why in proc.stderr


# --- found by the second review ----------------------------------------------------


async def test_a_flood_of_bare_sockets_does_not_push_out_a_client_past_tls(
        network: Network) -> None:
    """The handshake pool drops connections that have not finished TLS first: a client
    that has (or, at the ledger, whose certificate was verified) keeps its place."""
    network.ledger_settings["max_handshaking"] = 4
    up(network, max_handshaking=4)
    payer = await raw_router(network)  # TLS done, login not yet
    auditor = await open_channel(*network.procs["ledger"].addr, decoder_for((Welcome, Error)),
                                 name="auditor", tls=network.ledger_tls("auditor"))
    bare = []
    for i in range(40):
        for name in ("router", "ledger"):
            s = socket.socket()
            s.bind((f"127.0.{1 + i % 5}.{2 + i}", 0))
            s.connect(network.procs[name].addr)
            bare.append(s)
    await asyncio.sleep(0.3)
    answer, _, _ = await login(payer, "alice", network.keys.load_payer_key("alice"))
    assert isinstance(answer, Welcome)
    assert isinstance(await auditor.request(Hello(id=0, version=PROTOCOL_VERSION,
                                                  role="client", peer="a"), timeout=5),
                      Welcome)
    for s in bare:
        s.close()
    await payer.aclose()
    await auditor.aclose()


async def test_unmatched_replies_and_bad_frames_after_login_are_charged(
        network: Network) -> None:
    up(network, payer_requests_per_s=20.0)
    async with network.client("alice") as alice:
        ch = alice._channel
        assert ch is not None
        for i in range(100):
            ch.send_nowait(Pong(re=10_000 + i))  # answers to nothing
        with pytest.raises(RequestFailed) as info:
            await alice.test_router_link()
        assert info.value.code == ErrorCode.RATE_LIMITED
    async with network.client("bob") as bob:
        ch = bob._channel
        assert ch is not None
        ch.send_raw(encode_frame(b"\xc1") * 5)  # 20 tokens each: the budget is gone
        await asyncio.wait_for(bob.wait_closed(), 5)
    log = network.procs["router"].log_path.read_text()
    assert "payer closed: bad frames beyond its budget" in log


async def test_a_login_with_the_new_key_right_after_rotation_stays(network: Network) -> None:
    up(network)
    rotate(network.config, ["alice"])
    async with network.client("alice") as alice:  # reads the new key
        await asyncio.sleep(2.2)  # two rounds of the router's key check
        assert alice.connected
        assert await alice.test_router_link() > 0


async def test_bad_frame_log_lines_quote_the_peers_text(network: Network) -> None:
    up(network)
    async with network.client("alice") as alice:
        ch = alice._channel
        assert ch is not None
        ch.send_raw(encode_frame(msgspec.msgpack.encode(
            {"t": "ping", "id": 5, "x outcome=paid tx_id=T9 sender=alice": 1})))
        assert await alice.test_router_link() > 0
    line = next(ln for ln in network.procs["router"].log_path.read_text().splitlines()
                if "bad frame" in ln)
    assert ' reason="' in line, line  # one quoted field, not loose key=value pairs
    assert " outcome=paid" not in line.replace('"', "'").split(" reason=")[0]


async def test_public_key_files_must_be_plain_files_in_safe_folders(
        network: Network, tmp_path: Path) -> None:
    up(network)
    keys = network.keys
    alice_key = keys.load_payer_key("alice")
    pub = keys.payer_public("alice")
    # a symbolic link to the same bytes elsewhere: refused (the target could be anyone's)
    elsewhere = tmp_path / "alice.pub"
    elsewhere.write_bytes(pub.read_bytes())
    pub.unlink()
    pub.symlink_to(elsewhere)
    ch = await raw_router(network)
    await assert_refused_and_closed(ch, (await login(ch, "alice", alice_key))[0])
    # a FIFO: refused at once, the router does not block on it
    pub.unlink()
    os.mkfifo(pub)
    ch = await raw_router(network)
    await assert_refused_and_closed(ch, (await login(ch, "alice", alice_key))[0])
    pub.unlink()
    pub.write_bytes(elsewhere.read_bytes())
    pub.chmod(0o644)
    ch = await raw_router(network)
    assert isinstance((await login(ch, "alice", alice_key))[0], Welcome)
    await ch.aclose()
    # a key folder writable by others: nobody logs in until it is fixed
    keys.payers_public_dir.chmod(0o777)
    try:
        ch = await raw_router(network)
        await assert_refused_and_closed(ch, (await login(ch, "alice", alice_key))[0])
    finally:
        keys.payers_public_dir.chmod(0o755)
    ch = await raw_router(network)
    assert isinstance((await login(ch, "alice", alice_key))[0], Welcome)
    await ch.aclose()
    log = network.procs["router"].log_path.read_text()
    assert "is a symbolic link" in log
    assert "no logins until the key folders are safe" in log
    no_tracebacks(network)


async def test_a_daemon_with_an_unusable_key_or_an_untrusted_router_keeps_trying(
        network: Network, tmp_path: Path) -> None:
    """The daemon's own failure paths: its key made readable by others after it started
    (it says so and retries; fixed, it logs in again), and a router whose certificate
    another CA signed (it says so, sends nothing, keeps trying)."""
    up(network)
    network.start_payer("bob")
    key = network.keys.payer_private("bob")
    key.chmod(0o644)
    network.procs["router"].kill()
    await asyncio.to_thread(network.restart, "router")
    log = network.procs["bob"].log_path
    for _ in range(100):
        if "cannot log in" in log.read_text():
            break
        await asyncio.sleep(0.1)
    assert "chmod 600" in log.read_text()
    key.chmod(0o600)
    for _ in range(100):  # reconnect_max_s is 0.5 s in the test network
        if (await network.inspect()).sessions == ["bob"]:
            break
        await asyncio.sleep(0.1)
    assert (await network.inspect()).sessions == ["bob"]
    # an impostor router: same network id and names, another CA
    impostor = other_network_keys(tmp_path)
    echo = await asyncio.to_thread(Proc("impostor", python_module(
        "bench.echo", "--tls", str(impostor.config_path)), tmp_path / "impostor.log",
        env=network.env()).start)
    alice_log = tmp_path / "alice.log"
    with alice_log.open("w") as err:
        daemon = await asyncio.create_subprocess_exec(
            *python_module("payer_client", "run", "--config", str(network.config_path),
                           "--id", "alice", "--router", echo.ready["addr"]),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, env=network.env())
    try:
        for _ in range(100):
            if "router not trusted" in alice_log.read_text():
                break
            await asyncio.sleep(0.1)
        text = alice_log.read_text()
        assert "router not trusted" in text
        assert "certificate was refused" in text
        assert "Traceback" not in text
        assert daemon.returncode is None  # still running, still trying
    finally:
        daemon.terminate()
        await daemon.wait()
        await asyncio.to_thread(echo.stop)
