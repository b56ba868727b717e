"""Minimal framed echo servers: the loopback limits JackPay is compared against.

    python -m bench.echo                      # answers every ping with a pong
    python -m bench.echo --upstream H:P       # a middle hop: forwards each ping upstream,
                                              # answers when upstream answered
    python -m bench.echo --tls CONFIG ...     # the same over TLS 1.3, with the router's
                                              # certificate of the network CONFIG

Both use the same framing and Channel as JackPay, on the same event loop choice, so the
difference to JackPay is JackPay's own work. Prints `READY echo addr=H:P`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

from common import PROTOCOL_VERSION
from common.aio import Channel, open_channel, run, start_channel_server
from common.config import load_config
from common.keys import KeyStore
from common.messages import Hello, Message, Ping, Pong, Welcome, decoder_for
from common.procs import print_ready
from common.tls import ClientTls, client_tls, server_context

_REQUESTS = decoder_for((Hello, Ping))
_REPLIES = decoder_for((Welcome, Pong))


async def serve(host: str, port: int, upstream: tuple[str, int] | None,
                tls: tuple[ssl.SSLContext, ClientTls] | None) -> int:
    up: Channel | None = None
    if upstream is not None:
        up = await open_channel(*upstream, _REPLIES, name="upstream",
                                tls=tls[1] if tls is not None else None)
        await up.request(Hello(id=0, version=PROTOCOL_VERSION, role="client", peer="middle"))

    def on_message(ch: Channel, msg: Message) -> object:
        if isinstance(msg, Hello):
            ch.handshake_complete()  # as every server does after hello (common.aio)
            ch.send_nowait(Welcome(re=msg.id, version=PROTOCOL_VERSION, server="echo"))
            return None
        if isinstance(msg, Ping):
            if up is None:
                ch.send_nowait(Pong(re=msg.id))
                return None
            return forward(ch, msg.id)
        return None

    async def forward(ch: Channel, rid: int) -> None:
        assert up is not None
        await up.request(Ping(id=0))
        ch.send_nowait(Pong(re=rid))

    def on_connect(ch: Channel) -> None:
        ch.on_message = on_message  # type: ignore[assignment]
        ch.start()

    server = await start_channel_server(on_connect, _REQUESTS, host, port, name="client",
                                        tls=tls[0] if tls is not None else None)
    h, p = server.sockets[0].getsockname()[:2]
    print_ready("echo", addr=f"{h}:{p}")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.echo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--tls", metavar="CONFIG", help="serve (and reach upstream) over TLS "
                   "with the router's certificate of this network")
    a = p.parse_args(argv)
    tls = None
    if a.tls:
        store = KeyStore.for_config(load_config(a.tls))
        tls = (server_context(store, "router"), client_tls(store, "router"))
    upstream = None
    if a.upstream:
        h, _, port = a.upstream.rpartition(":")
        upstream = (h, int(port))
    return run(lambda: serve(a.host, a.port, upstream, tls), fast=not a.no_uvloop)


if __name__ == "__main__":
    sys.exit(main())
