"""Helpers of the payment tests (end to end, real processes): a network brought up with
given balances, the ledger's rows and their replay, the conservation checks, an
in-process payer that records what the router sends it, and `eventually`. Shared by the
test modules that drive payments; the tests themselves live in those modules."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from netkit import Network

from common.errors import RequestFailed
from common.messages import ISSUER, Cancel, Offer, Settled
from common.money import parse_amount
from payer_client.client import PayerClient


def up(net: Network, participants: dict[str, str], *, max_incoming: dict[str, str] | None = None,
       **router_settings: Any) -> None:
    net.participants = participants
    net.max_incoming = max_incoming or {}
    net.router_settings.update(router_settings)
    net.write_config()
    net.start_ledger()
    net.start_router()


def ledger_rows(net: Network) -> list[dict[str, str]]:
    text = net.ledger_csv()
    return list(csv.DictReader(io.StringIO(text, newline=""))) if text else []


def replay(net: Network) -> dict[str, int]:
    """Balances from the ledger file alone."""
    bal: dict[str, int] = {}
    for r in ledger_rows(net):
        amount = parse_amount(r["amount"])
        bal[r["sender"]] = bal.get(r["sender"], 0) - amount
        bal[r["receiver"]] = bal.get(r["receiver"], 0) + amount
    return bal


def assert_conserved(net: Network) -> dict[str, int]:
    bal = replay(net)
    assert sum(bal.values()) == 0, bal
    assert all(v >= 0 for k, v in bal.items() if k != ISSUER), bal
    keys = [(r["sender"], r["tx_id"]) for r in ledger_rows(net)]
    assert len(keys) == len(set(keys)), "a (sender, tx_id) is in the ledger twice"
    return bal


async def assert_router_agrees(net: Network) -> None:
    """Once quiet, the router holds nothing and its balances are a replay of the ledger."""
    state = await net.wait_quiet(5.0)
    assert state.in_flight == []
    assert state.holds == {}
    assert {k: v for k, v in state.balances.items() if v} == {
        k: v for k, v in replay(net).items() if v}


@dataclass
class Peer:
    """An in-process payer on the importable client, recording what the router sends."""

    client: PayerClient
    offers: list[Offer] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)

    async def pay(self, to: str, amount: int, tx_id: str | None = None, memo: str = "") -> str:
        """'paid' or the error code."""
        try:
            await self.client.send_payment(to, amount, memo, tx_id)
        except RequestFailed as exc:
            return str(exc.code)
        return "paid"

    async def balance(self) -> tuple[int, int]:
        reply = await self.client.query_balance()
        return reply.balance, reply.available

    async def assert_no_hold(self) -> int:
        balance, available = await self.balance()
        assert balance == available
        return balance


Decide = Callable[[Offer], Awaitable[bool | str | None]]


async def connect(net: Network, payer_id: str, decide: Decide | None = None) -> Peer:
    host, port = net.procs["router"].addr
    peer: Peer

    async def on_offer(offer: Offer) -> bool | str | None:
        peer.offers.append(offer)
        return None if decide is None else await decide(offer)

    client = net.client(payer_id, router=(host, port), on_offer=on_offer,
                        on_settled=lambda m: peer.settled.append(m),
                        on_cancel=lambda m: peer.cancels.append(m), request_timeout_s=15)
    peer = Peer(client)
    await client.connect()
    return peer


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
