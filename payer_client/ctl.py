"""The CLI's side of the control socket: connect to the local daemon, say hello, ask.

`DaemonNotRunning` means no daemon answers on the socket (the CLI exits 3 with a hint on
how to start one). Error replies raise RequestFailed with their code, as elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common import PROTOCOL_VERSION
from common.aio import Channel, open_unix_channel
from common.errors import ConnectionLost, JackPayError
from common.messages import CONTROL_REPLIES, Hello, Message, Welcome, decoder_for

_DECODER = decoder_for(CONTROL_REPLIES)
M = TypeVar("M", bound=Message)


class DaemonNotRunning(JackPayError):
    """No payer daemon answers on the control socket."""


class ControlClient:
    def __init__(self, path: Path, payer_id: str, start_hint: str) -> None:
        self.path = path
        self.payer_id = payer_id
        self.start_hint = start_hint
        self.channel: Channel | None = None
        self.welcome: Welcome | None = None
        self.on_event: Callable[[Message], None] | None = None

    async def connect(self, timeout: float = 5.0) -> Welcome:
        """Raises DaemonNotRunning with a message saying how to start the daemon."""
        try:
            self.channel = await open_unix_channel(
                str(self.path), _DECODER, name=f"daemon({self.payer_id})",
                connect_timeout=timeout, on_message=self._on_message)
            reply = await self.channel.request(
                Hello(id=0, version=PROTOCOL_VERSION, role="cli", peer=self.payer_id),
                timeout=timeout)
        except (OSError, TimeoutError, ConnectionLost) as exc:
            await self.close()
            raise DaemonNotRunning(
                f"no payer daemon for {self.payer_id} at {self.path}; start it with: "
                f"{self.start_hint}") from exc
        if not isinstance(reply, Welcome):
            raise DaemonNotRunning(f"the process at {self.path} is not a payer daemon")
        self.welcome = reply
        return reply

    async def request(self, msg: Message, expect: type[M], timeout: float | None = None) -> M:
        """Raises RequestFailed (error reply), ConnectionLost (daemon went away)."""
        assert self.channel is not None, "connect() first"
        reply = await self.channel.request(msg, timeout=timeout)
        if not isinstance(reply, expect):
            raise ConnectionLost(f"daemon answered with {type(reply).__name__}")
        return reply

    def _on_message(self, ch: Channel, msg: Message) -> None:
        if self.on_event is not None:
            self.on_event(msg)

    async def wait_closed(self) -> None:
        if self.channel is not None:
            await self.channel.wait_closed()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.aclose()


__all__ = ["ControlClient", "DaemonNotRunning"]
