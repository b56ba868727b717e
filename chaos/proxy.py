"""A fault-injecting TCP proxy (asyncio), modelled on Toxiproxy's toxics.

    proxy = FaultProxy(("127.0.0.1", ledger_port))
    host, port = await proxy.start()        # point the router at (host, port)
    proxy.set_latency(0.2)                   # every chunk, each direction, 200 ms later
    proxy.set_trickle(True)                  # forward one byte at a time
    proxy.set_blackhole(True)                # a partition: nothing passes until heal()
    proxy.cut_after(40, "up")                # close each connection once 40 more bytes went up
    proxy.reset_all()                        # RST every open connection now
    proxy.heal()                             # back to a clean pipe
    await proxy.stop()

Faults apply to open connections at once and to new ones. A black hole holds bytes back
(as TCP does across a partition) rather than dropping part of a stream, which no real
network does and which TLS would rightly refuse. "up" is client → upstream,
"down" is upstream → client. With `cut_after(n, "up")` a request can reach the server
while its reply is lost: the in-doubt window the router must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    sent: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    cut_at: dict[str, int | None] = field(default_factory=lambda: {"up": None, "down": None})
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, rst: bool = False) -> None:
        for w in (self.client, self.upstream):
            if rst:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            w.transport.abort()


def _peer_gone(w: asyncio.StreamWriter) -> bool:
    """Has the other end of this socket closed or reset it? (The kernel knows at once,
    before the event loop has read the news.)"""
    sock = w.get_extra_info("socket")
    if sock is None:
        return True
    try:
        probe = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return True
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.latency_s = 0.0
        self.trickle = False
        self.blackhole = False
        self._open = asyncio.Event()  # set while no black hole holds traffic back
        self._open.set()
        self._cut: dict[str, int | None] = {"up": None, "down": None}
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[object]] = set()  # one per accepted connection
        self._server: asyncio.Server | None = None
        self.connections_total = 0

    # --- control -------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        self.latency_s = seconds

    def set_trickle(self, on: bool) -> None:
        self.trickle = on

    def set_blackhole(self, on: bool) -> None:
        self.blackhole = on
        if on:
            self._open.clear()
        else:
            self._open.set()

    def cut_after(self, n_bytes: int, direction: Direction = "up") -> None:
        """Close each connection once `n_bytes` more bytes have gone `direction`."""
        self._cut[direction] = n_bytes
        for c in self._conns:
            c.cut_at[direction] = c.sent[direction] + n_bytes

    def reset_all(self) -> None:
        """Send RST on every open connection (both sides)."""
        for c in list(self._conns):
            c.abort(rst=True)

    def heal(self) -> None:
        self.latency_s = 0.0
        self.trickle = False
        self.set_blackhole(False)
        self._cut = {"up": None, "down": None}
        for c in self._conns:
            c.cut_at = {"up": None, "down": None}

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self.host, self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.abort()
            for t in c.tasks:
                t.cancel()
        # Let every connection's handler end here, not when the loop is torn down later
        # (its done-callback would then close a transport of a closed loop).
        handlers = set(self._handlers)
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # --- pumping -------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self.connections_total += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        conn = _Conn(writer, up_writer)
        for d in ("up", "down"):
            if self._cut[d] is not None:
                conn.cut_at[d] = self._cut[d]
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, up_writer, "up")),
            asyncio.create_task(self._pump(conn, up_reader, writer, "down")),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            conn.abort()

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: str) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                # A partition: nothing passes until it heals (what TCP does: it cannot drop
                # part of a stream); a sender that died meanwhile takes its bytes with it.
                if self.blackhole:
                    await self._open.wait()
                    if _peer_gone(conn.client if direction == "up" else conn.upstream):
                        return
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                limit = conn.cut_at[direction]
                if limit is not None and conn.sent[direction] + len(data) >= limit:
                    data = data[: max(0, limit - conn.sent[direction])]
                    await self._write(dst, data)
                    conn.sent[direction] += len(data)
                    conn.abort()
                    return
                await self._write(dst, data)
                conn.sent[direction] += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.abort()

    async def _write(self, dst: asyncio.StreamWriter, data: bytes) -> None:
        if not data:
            return
        if self.trickle:
            for i in range(len(data)):
                dst.write(data[i : i + 1])
                await dst.drain()
                await asyncio.sleep(0.001)
        else:
            dst.write(data)
            await dst.drain()
