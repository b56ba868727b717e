"""The real ledger process on an ephemeral port: appends, idempotency, group commit,
crash recovery, hostile input and real write failures. Tests that touch the store run
against both stores (`store`: the CSV file, and PostgreSQL on a real throwaway server);
the file-specific ones (size limits, corrupt lines) and the wire-level ones run on CSV."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import struct
import subprocess
import sys

import msgspec
import pytest
from netkit import Network, fsize_limit

from common import PROTOCOL_VERSION
from common.aio import Channel
from common.errors import ConnectionLost, RequestFailed
from common.framing import encode_frame
from common.messages import (
    LEDGER_REPLIES,
    Append,
    Appended,
    Ping,
    Pong,
    Read,
    RowIn,
    Rows,
    Stats,
    StatsReply,
    decoder_for,
)
from ledger.verify import verify_database, verify_file

DECODER = decoder_for(LEDGER_REPLIES)


@pytest.fixture(params=["csv", "postgresql"])
def store(request: pytest.FixtureRequest, network: Network) -> str:
    """Which store the test's ledger runs on (set in the network's config)."""
    if request.param == "postgresql":
        dsn = request.getfixturevalue("pg_dsn")
        network.store, network.dsn = "postgresql", dsn  # (rows read back from it too)
        network.write_config()
    return str(request.param)


async def verified(network: Network) -> bool:
    """The ledger's store passes `verify` (the file, or the database)."""
    if network.store == "postgresql":
        verdict = await verify_database(network.dsn)
        assert verdict.ok, verdict.line
        return verdict.ok
    return verify_file(network.ledger_path).ok


async def connect(net: Network) -> Channel:
    return await net.ledger_channel()


def row(i: int, amount: int = 100, memo: str = "", receiver: str = "alice") -> RowIn:
    return RowIn(tx_id=f"tx{i}", sender="_issuer", receiver=receiver, amount=amount, memo=memo)


async def append(ch: Channel, *rows: RowIn) -> Appended:
    reply = await ch.request(Append(id=0, rows=list(rows)), timeout=10)
    assert isinstance(reply, Appended)
    return reply


async def stats(ch: Channel) -> StatsReply:
    reply = await ch.request(Stats(id=0))
    assert isinstance(reply, StatsReply)
    return reply


async def test_append_and_read_back(network: Network, store: str) -> None:
    network.start_ledger()
    ch = await connect(network)
    res = await append(ch, row(1, memo='a,"b"\n=c'), row(2, receiver="bob"), row(3))
    assert [r.status for r in res.results] == ["written"] * 3
    assert [r.seq for r in res.results] == [1, 2, 3]
    page = await ch.request(Read(id=0, from_seq=1, limit=2))
    assert isinstance(page, Rows)
    assert [r.tx_id for r in page.rows] == ["tx1", "tx2"]
    assert page.rows[0].memo == 'a,"b"\n=c'
    assert (page.next_seq, page.last_seq) == (3, 3)
    rest = await ch.request(Read(id=0, from_seq=page.next_seq))
    assert isinstance(rest, Rows)
    assert [r.seq for r in rest.rows] == [3]
    bobs = await ch.request(Read(id=0, party="bob"))
    assert isinstance(bobs, Rows)
    assert [r.tx_id for r in bobs.rows] == ["tx2"]
    await ch.aclose()
    assert network.procs["ledger"].stop() == 0
    assert await verified(network)
    if store == "csv":
        assert ',"a,""b""\\n=c",' in network.ledger_path.read_text()  # one line, CSV-quoted


async def test_duplicate_and_conflicting_tx_id(network: Network, store: str) -> None:
    network.start_ledger()
    ch = await connect(network)
    first = await append(ch, row(1, amount=500))
    again = await append(ch, row(1, amount=500))
    other = await append(ch, row(1, amount=501))
    assert again.results[0].status == "duplicate"
    assert again.results[0].seq == first.results[0].seq
    assert again.results[0].hash == first.results[0].hash
    assert other.results[0].status == "conflict"
    assert other.results[0].seq == 1
    assert (await stats(ch)).rows == 1


async def test_group_commit_1000_concurrent_appends(network: Network, store: str) -> None:
    network.start_ledger()
    chans = [await connect(network) for _ in range(4)]
    results = await asyncio.gather(*[append(chans[i % 4], row(i)) for i in range(1000)])
    assert all(r.results[0].status == "written" for r in results)
    assert sorted(r.results[0].seq for r in results) == list(range(1, 1001))
    st = await stats(chans[0])
    assert st.rows == 1000
    assert st.fsyncs < 1000 / 4, f"group commit did not batch: {st.fsyncs} fsyncs"
    if store == "csv":  # one fsync per batch (the database counts one commit per batch)
        assert st.batches == st.fsyncs
    assert 0 < st.fsync_us_max <= st.fsync_us_total  # the disk's time is measured
    assert st.slow_fsyncs <= st.fsyncs
    assert await verified(network)


async def test_sigkill_mid_stream_loses_no_acked_row(network: Network, store: str) -> None:
    network.start_ledger()
    ch = await connect(network)
    acked: set[str] = set()
    enough = asyncio.Event()

    async def writer(k: int) -> None:
        for i in range(10_000):
            try:
                await append(ch, row(k * 100_000 + i, memo="x" * 50))
            except (ConnectionLost, TimeoutError):
                return
            acked.add(f"tx{k * 100_000 + i}")
            if len(acked) >= 300:
                enough.set()

    tasks = [asyncio.create_task(writer(k)) for k in range(8)]
    await asyncio.wait_for(enough.wait(), 30)
    network.procs["ledger"].kill()
    await asyncio.gather(*tasks)
    # The kill may leave a torn last line; the restart cuts it off and verify passes.
    network.start_ledger()
    assert await verified(network)
    ch2 = await connect(network)
    seen: set[str] = set()
    nxt = 1
    while True:
        page = await ch2.request(Read(id=0, from_seq=nxt, limit=1000))
        assert isinstance(page, Rows)
        if not page.rows:
            break
        seen.update(r.tx_id for r in page.rows)
        nxt = page.next_seq
    assert acked <= seen, f"acked rows lost: {sorted(acked - seen)[:5]}"


def raw_socket(net: Network) -> socket.socket:
    """A blocking TLS socket to the ledger with the router's certificate: what a buggy or
    hostile router would have."""
    tls = net.ledger_tls()
    s = socket.create_connection(net.procs["ledger"].addr, timeout=5)
    return tls.context.wrap_socket(s, server_hostname=tls.server_name)


def read_frames(s: socket.socket) -> list[object]:
    """Read frames until the peer closes or 1 s of silence."""
    s.settimeout(1.0)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(msgspec.msgpack.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def hello_frame() -> bytes:
    return encode_frame(msgspec.msgpack.encode({"t": "hello", "id": 1, "version": PROTOCOL_VERSION,
                                                "role": "router"}))


@pytest.mark.parametrize(("name", "payload", "expect"), [
    ("garbage-bytes", b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", "bad_request"),
    ("oversize-prefix", struct.pack(">I", 10_000_000), "frame_too_large"),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "frame_too_large"),
    ("float-amount", encode_frame(msgspec.msgpack.encode({"t": "append", "id": 7, "rows": [
        {"tx_id": "t", "sender": "_issuer", "receiver": "a", "amount": 1.5}]})), "bad_request"),
    ("bool-amount", encode_frame(msgspec.msgpack.encode({"t": "append", "id": 7, "rows": [
        {"tx_id": "t", "sender": "_issuer", "receiver": "a", "amount": True}]})), "bad_request"),
    ("unknown-type", encode_frame(msgspec.msgpack.encode({"t": "drop_table", "id": 7})), "bad_request"),
])
async def test_hostile_input_gets_an_error_and_others_keep_being_served(
        network: Network, name: str, payload: bytes, expect: str) -> None:
    network.start_ledger()
    good = await connect(network)
    s = raw_socket(network)
    s.sendall(hello_frame() + payload)
    frames = await asyncio.to_thread(read_frames, s)
    s.close()
    errors = [f for f in frames if isinstance(f, dict) and f.get("t") == "error"]
    assert errors, f"no error frame for {name}: {frames}"
    assert errors[0]["code"] == expect
    if expect == "bad_request" and name != "garbage-bytes":
        assert errors[0]["re"] == 7
    assert isinstance(await good.request(Ping(id=0)), Pong)
    assert (await append(good, row(1))).results[0].status == "written"


async def test_first_frame_must_be_hello(network: Network) -> None:
    network.start_ledger()
    s = raw_socket(network)
    s.sendall(encode_frame(msgspec.msgpack.encode({"t": "ping", "id": 3})))
    frames = await asyncio.to_thread(read_frames, s)
    assert frames == [{"t": "error", "re": 3, "code": "hello_required",
                       "message": "the first frame must be hello"}]



async def test_real_write_failure_leaves_file_unchanged_and_keeps_serving(network: Network) -> None:
    network.start_ledger()
    ch = await connect(network)
    await append(ch, row(1), row(2))
    await ch.aclose()
    network.procs["ledger"].stop()
    before = network.ledger_path.read_bytes()
    network.start_ledger(preexec_fn=fsize_limit(len(before) + 150))
    ch = await connect(network)
    with pytest.raises(RequestFailed) as info:
        await append(ch, row(3, memo="y" * 200), row(4, memo="z" * 200))
    assert info.value.code == "ledger_write_failed"
    assert network.ledger_path.read_bytes() == before
    assert isinstance(await ch.request(Ping(id=0)), Pong)
    assert (await stats(ch)).rows == 2
    small = await append(ch, row(5))  # fits under the limit: the service still writes
    assert small.results[0].seq == 3
    assert verify_file(network.ledger_path).ok


def test_refuses_to_start_on_a_corrupt_middle(network: Network) -> None:
    network.start_ledger()

    async def fill() -> None:
        ch = await connect(network)
        await append(ch, row(1), row(2), row(3))
        await ch.aclose()

    asyncio.run(fill())
    network.procs["ledger"].stop()
    lines = network.ledger_path.read_text().splitlines(keepends=True)
    # An edit that changes the file's length: the index no longer describes the file, so
    # the start reads it whole (an edit of the same length is `verify`'s to find:
    # tests/test_ledger_index.py).
    lines[2] = lines[2].replace(",1.00,", ",100.00,")
    network.ledger_path.write_text("".join(lines))
    before = network.ledger_path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "ledger", "--config", str(network.config_path),
                           "--port", "0"], capture_output=True, text=True, timeout=20,
                          env=network.env())
    assert proc.returncode == 2
    assert "line 3" in proc.stderr
    assert "hash does not match" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert network.ledger_path.read_bytes() == before
    verdict = subprocess.run([sys.executable, "-m", "ledger", "verify", str(network.ledger_path)],
                             capture_output=True, text=True, env=network.env())
    assert verdict.returncode == 1
    assert verdict.stdout.startswith("FAIL")


async def test_a_second_ledger_on_the_same_file_is_refused_and_the_first_serves_on(
        network: Network) -> None:
    """Two writers of one CSV file would interleave their rows and break the chain: the
    file is locked while a ledger holds it, and a second one (a slip of a config, a
    restart before the old process ended) stops at once, saying which file, touching
    nothing."""
    network.start_ledger()
    ch = await connect(network)
    await append(ch, row(1), row(2))
    before = network.ledger_path.read_bytes()
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ledger", "--config", str(network.config_path),
                         "--port", "0"], capture_output=True, text=True, timeout=20,
        env=network.env())
    assert proc.returncode == 2
    assert str(network.ledger_path) in proc.stderr
    assert "another ledger" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert network.ledger_path.read_bytes() == before
    assert (await append(ch, row(3))).results[0].seq == 3  # the first one serves on
    await ch.aclose()
    network.procs["ledger"].stop()
    # Its lock ends with the process: the next start opens the file.
    network.start_ledger()
    ch = await connect(network)
    assert (await stats(ch)).rows == 3
    await ch.aclose()


async def test_sigterm_finishes_queued_appends_and_exits_0(network: Network, store: str) -> None:
    network.start_ledger()
    ch = await connect(network)
    pending = [asyncio.create_task(append(ch, row(i))) for i in range(200)]
    await asyncio.sleep(0.01)  # let them be sent
    network.procs["ledger"].signal(signal.SIGTERM)
    done = await asyncio.gather(*pending, return_exceptions=True)
    acked = {f"tx{i}" for i, r in enumerate(done) if isinstance(r, Appended)}
    assert acked, "no append was acknowledged before the stop"
    assert network.procs["ledger"].wait(10) == 0
    assert await verified(network)
    if store == "csv":
        text = network.ledger_path.read_text()
        assert all(f",{tx}," in text for tx in acked)
    else:
        network.start_ledger()
        ch = await connect(network)
        page = await ch.request(Read(id=0, from_seq=1, limit=1000))
        assert isinstance(page, Rows)
        assert acked <= {r.tx_id for r in page.rows}


async def test_stats_reports_counters(network: Network, store: str) -> None:
    network.start_ledger()
    ch = await connect(network)
    await append(ch, row(1))
    st = await stats(ch)
    assert (st.rows, st.appends, st.batches, st.fsyncs) == (1, 1, 1, 1)
    assert len(st.last_hash) == 64


async def test_same_tx_id_twice_in_a_failed_batch_is_failed_for_both(network: Network) -> None:
    """A re-sent append lands in the same batch as the original; the write fails. The
    copy must not be told `duplicate` of a row that was rolled back (regression)."""
    network.start_ledger()
    ch = await connect(network)
    await append(ch, row(1))
    await ch.aclose()
    network.procs["ledger"].stop()
    before = network.ledger_path.read_bytes()
    network.start_ledger(preexec_fn=fsize_limit(len(before) + 10))
    ch = await connect(network)
    same = row(2, memo="re-sent")
    # Queued in one loop turn: one TCP write, so both requests join the same batch.
    answers = await asyncio.gather(append(ch, same), append(ch, same), return_exceptions=True)
    codes = [a.code if isinstance(a, RequestFailed) else a.results[0].status for a in answers]
    assert codes == ["ledger_write_failed", "ledger_write_failed"]
    assert network.ledger_path.read_bytes() == before
    assert (await stats(ch)).rows == 1


async def test_invalid_utf8_in_a_field_is_a_bad_request_and_the_connection_keeps_serving(
        network: Network) -> None:
    network.start_ledger()
    s = raw_socket(network)
    ping = encode_frame(msgspec.msgpack.encode({"t": "ping", "id": 9}))
    # A msgpack map whose `party` string holds bytes that are not UTF-8.
    body = msgspec.msgpack.encode({"t": "read", "id": 8, "party": "PLACEHOLDER"})
    body = body.replace(b"\xabPLACEHOLDER", b"\xab\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5")
    s.sendall(hello_frame() + encode_frame(body) + ping)
    frames = await asyncio.to_thread(read_frames, s)
    s.close()
    kinds = [(f.get("t"), f.get("code")) for f in frames if isinstance(f, dict)]
    assert ("error", "bad_request") in kinds
    assert ("pong", None) in kinds  # the same connection answered the next frame
