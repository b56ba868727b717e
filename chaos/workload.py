"""The workload: random concurrent payments through the payer daemons' control sockets,
every answer recorded, and every undecided payment retried with the same tx_id until the
network decides it (Jepsen's bank workload, JackPay-shaped).

Some payments are meant to fail: amounts above any balance (`insufficient_funds`) and a
receiver nobody registered (`unknown_receiver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos.checker import Attempt, Operation
from common import PROTOCOL_VERSION
from common.aio import Channel, open_unix_channel
from common.errors import ConnectionLost, RequestFailed
from common.messages import CONTROL_REPLIES, Hello, Paid, Send, decoder_for

_DECODER = decoder_for(CONTROL_REPLIES)
GHOST = "nobody-here"
MIX_AMOUNTS = (100, 250, 500)
# Answers that leave the payment undecided: ask again with the same tx_id.
INDETERMINATE_CODES = frozenset({"outcome_pending", "router_unavailable", "shutting_down",
                                 "internal_error", "rate_limited"})


@dataclass
class Workload:
    payers: list[str]
    control_socket: dict[str, Path]
    seed: int
    concurrency: int = 8
    max_amount: int = 2_000          # minor units; openings are larger, overdrafts happen
    request_timeout_s: float = 5.0
    mix_share: float = 0.0  # this share of payments goes through the mixer
    ops: list[Operation] = field(default_factory=list)
    undecided: dict[str, Operation] = field(default_factory=dict)
    last_success_at: float = 0.0
    successes: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, seq) of every `paid`
    # (started, answered, kind) of every attempt, monotonic: what waited across a fault
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    _channels: dict[str, Channel] = field(default_factory=dict)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed * 7919 + 1)

    # --- one attempt ---------------------------------------------------------------

    async def _channel(self, payer: str) -> Channel:
        ch = self._channels.get(payer)
        if ch is None or ch.closed:
            ch = await open_unix_channel(str(self.control_socket[payer]), _DECODER,
                                         name=f"control({payer})", connect_timeout=2.0)
            await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role="cli", peer="chaos"), timeout=2.0)
            self._channels[payer] = ch
        return ch

    async def attempt(self, op: Operation) -> Attempt:
        started = time.monotonic()
        try:
            ch = await self._channel(op.sender)
            reply = await ch.request(Send(id=0, to=op.receiver, amount=op.amount,
                                          memo=op.memo, tx_id=op.tx_id, mix=op.mix),
                                     timeout=self.request_timeout_s)
        except RequestFailed as exc:
            code = str(exc.code)
            kind = "indeterminate" if code in INDETERMINATE_CODES else "failed"
            result = Attempt(kind, code)  # type: ignore[arg-type]
        except (ConnectionLost, TimeoutError, OSError):
            result = Attempt("indeterminate", "no_answer")
        else:
            assert isinstance(reply, Paid)
            result = Attempt("ok", seq=reply.seq)
            self.last_success_at = time.monotonic()
            self.successes.append((self.last_success_at, reply.seq))
        op.attempts.append(result)
        self.timeline.append((started, time.monotonic(), result.kind))
        if result.kind == "indeterminate":
            self.undecided[op.tx_id] = op
        else:
            self.undecided.pop(op.tx_id, None)
        return result

    # --- generating ----------------------------------------------------------------

    def new_operation(self) -> Operation:
        self._counter += 1
        sender = self.rng.choice(self.payers)
        roll = self.rng.random()
        if roll < 0.03:
            receiver = GHOST
        else:
            receiver = self.rng.choice([p for p in self.payers if p != sender])
        amount = self.rng.randint(1, self.max_amount)
        if roll > 0.97:
            amount = 10**12  # far above any balance
        op = Operation(f"c{self.seed}-{self._counter}", sender, receiver, amount)
        if self.mix_share and receiver != GHOST and self.rng.random() < self.mix_share:
            # A few common amounts, so that rounds fill (the mixer pools per amount).
            op.mix = True
            op.amount = self.rng.choice(MIX_AMOUNTS)
        self.ops.append(op)
        return op

    async def run_for(self, seconds: float) -> None:
        """Fresh payments (and retries of undecided ones) from `concurrency` workers."""
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop_at:
                retry = next((o for o in list(self.undecided.values())
                              if o.sender == self.rng.choice(self.payers)), None)
                await self.attempt(retry or self.new_operation())
                if retry is not None:
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def settle_undecided(self, seconds: float) -> bool:
        """Retry every undecided payment until all are decided or time runs out."""
        deadline = time.monotonic() + seconds
        while self.undecided and time.monotonic() < deadline:
            batch = list(self.undecided.values())
            await asyncio.gather(*(self.attempt(op) for op in batch))
            if self.undecided:
                await asyncio.sleep(0.3)
        return not self.undecided

    async def probe_success(self, tries: int = 20) -> bool:
        """After healing: does a fresh, affordable payment go through?"""
        for _ in range(tries):
            sender, receiver = self.rng.sample(self.payers, 2)
            self._counter += 1
            op = Operation(f"c{self.seed}-probe{self._counter}", sender, receiver, 1)
            self.ops.append(op)
            res = await self.attempt(op)
            while res.kind == "indeterminate" and len(op.attempts) < 20:
                await asyncio.sleep(0.3)
                res = await self.attempt(op)
            if res.kind == "ok":
                return True
            await asyncio.sleep(0.2)
        return False

    async def close(self) -> None:
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.aclose()
        self._channels.clear()
