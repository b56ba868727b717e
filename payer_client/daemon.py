"""The payer daemon: one session with the router, kept alive, plus a local control socket.

Rules:
- the session is re-opened with capped exponential backoff (0.1 s doubling up to
  `payer.reconnect_max_s`); READY is printed once the control socket listens and the
  first session is up;
- offers are decided by the participant's `AcceptancePolicy`; accepted offers stay
  pending until `settled` or `cancel`, and after a reconnect the daemon asks `status`
  for each of them;
- an outgoing payment stays in the outbox until the router decides it; after a lost
  connection, a timeout or `outcome_pending` it is re-sent with the same `tx_id` (which
  never moves money twice). A CLI caller waits at most `payer.request_timeout_s` and is
  then told `outcome_pending` while the daemon keeps trying;
- shutdown (SIGTERM/SIGINT, or `stop` set by a test) is: stop accepting control
  connections, refuse new sends, let the outbox drain for a grace period, close the
  session, remove the socket file. Exit code 0.
- one log line per payment decision (tx_id, peer, amount, outcome/code), and per
  connect, disconnect and retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from common.aio import Channel, watch
from common.config import NetworkConfig
from common.errors import ConfigError, ConnectionLost, ErrorCode, RequestFailed
from common.logs import log_event
from common.messages import Cancel, Event, Message, Offer, Paid, Pay, Settled
from common.metrics import counter, counters, gauge, serve_metrics
from common.money import format_amount
from common.procs import print_ready
from common.proofs import KeptProof, append_proof
from common.tls import TlsFailed
from payer_client.client import PayerClient, PayerCredentials
from payer_client.control import ControlServer
from payer_client.policy import AcceptancePolicy

log = logging.getLogger("jackpay.payer")

INITIAL_BACKOFF_S = 0.1
PENDING_RETRY_S = 0.5
SHUTDOWN_GRACE_S = 5.0
RETRY_CODES = frozenset({ErrorCode.OUTCOME_PENDING, ErrorCode.SHUTTING_DOWN,
                         ErrorCode.RATE_LIMITED})
# Refusals that a quick retry will not change (a key that does not match, a config that
# does not name us): wait the longest backoff between tries.
SLOW_RETRY_CODES = frozenset({ErrorCode.UNKNOWN_PAYER, ErrorCode.AUTH_FAILED,
                              ErrorCode.RATE_LIMITED, ErrorCode.PARTICIPANT_SUSPENDED})


@dataclass
class Outgoing:
    """A payment sent (or to be sent) that has no final answer yet."""

    pay: Pay
    future: asyncio.Future[Paid]
    attempts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def same_params(self, other: Pay) -> bool:
        p = self.pay
        return (p.to, p.amount, p.memo, p.mix) == (other.to, other.amount, other.memo,
                                                   other.mix)


def _consume(fut: asyncio.Future[Paid]) -> None:
    """Retrieve a future's exception so an abandoned one does not warn at exit."""
    if not fut.cancelled():
        fut.exception()


class PayerDaemon:
    def __init__(self, config: NetworkConfig, payer_id: str, router_host: str,
                 router_port: int, metrics_addr: str | None = None) -> None:
        participant = config.participant(payer_id)
        self.metrics_addr = metrics_addr
        self.metrics_at: str | None = None
        self._metrics_server: Any = None
        # Counted for the metrics: how sent payments ended, sessions opened, received.
        self.outcomes: dict[str, int] = {}
        self.connects = 0
        self.received = 0
        self.config = config
        self.payer_id = payer_id
        self.router_host = router_host
        self.router_port = router_port
        self.policy = AcceptancePolicy(payer_id, participant.max_incoming_minor)
        self.control = ControlServer(self, config.control_socket(payer_id))
        # The ledger's receipts of this payer's payments, kept for an audit (common/proofs.py).
        self.receipts_path = config.resolve(config.payer.receipts_dir) / f"{payer_id}.jsonl"
        self.client: PayerClient | None = None
        self.suspended = False  # the router refused our last login: participant_suspended
        self.outbox: dict[str, Outgoing] = {}
        self.offers: dict[tuple[str, str], Offer] = {}  # by (sender, tx_id)
        self.watchers: set[Channel] = set()
        self._session_up = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self._announced = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def router_addr(self) -> str:
        return f"{self.router_host}:{self.router_port}"

    def start_metrics(self) -> None:
        """Serve this daemon's metrics (`run --metrics HOST:PORT`). Raises ConfigError,
        OSError."""
        if self.metrics_addr:
            host, port, self._metrics_server = serve_metrics(self.metrics_addr, self.metrics)
            self.metrics_at = f"{host}:{port}"

    def metrics(self) -> Iterator[Metric]:
        yield counters("jackpay_payer_payments", "Payments this daemon sent, by outcome",
                       "outcome", dict(self.outcomes))
        yield counter("jackpay_payer_received", "Payments settled to this payer",
                      self.received)
        yield counter("jackpay_payer_connects", "Router sessions opened (reconnects + 1)",
                      self.connects)
        yield gauge("jackpay_payer_connected", "1 while the daemon has a router session",
                    1.0 if self._session_up.is_set() else 0.0)
        yield gauge("jackpay_payer_outbox", "Payments waiting for the router's decision",
                    len(self.outbox))

    # --- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set; returns the exit code. Raises ConfigError if the
        control socket cannot be served (e.g. another daemon already serves it)."""
        await self.control.start()
        session = asyncio.create_task(self._session_loop(), name="router-session")
        died: list[str] = []

        def on_death(reason: str) -> None:  # no session could ever be opened again
            died.append(reason)
            stop.set()

        watch(session, "the router session loop", on_death)
        try:
            await stop.wait()
            ended_by_death = bool(died)  # (not an error of the shutdown that follows)
        finally:
            await self._shutdown(session)
        return 3 if ended_by_death else 0

    async def _shutdown(self, session: asyncio.Task[None]) -> None:
        log_event(log, "stopping", payer=self.payer_id, in_flight=len(self.outbox))
        self._closing = True
        await self.control.stop_accepting()
        pending = [o.future for o in self.outbox.values()]
        if pending:
            await asyncio.wait(pending, timeout=min(SHUTDOWN_GRACE_S,
                                                    self.config.payer.request_timeout_s))
        self._stopping.set()
        for entry in list(self.outbox.values()):
            if entry.task is not None:
                entry.task.cancel()
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)  # (ended by a bug: watched)
        if self.client is not None:
            await self.client.close()
        for task in list(self._tasks):
            task.cancel()
        await self.control.close()
        log_event(log, "stopped", payer=self.payer_id)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the router session --------------------------------------------------------

    async def _session_loop(self) -> None:
        delay = INITIAL_BACKOFF_S
        cap = self.config.payer.reconnect_max_s
        while not self._stopping.is_set():
            try:
                # Read the key at every login: after `jackpay-keys --rotate` the next
                # session proves the new one.
                client = PayerClient(
                    self.router_host, self.router_port, self.payer_id,
                    credentials=PayerCredentials.from_config(self.config, self.payer_id),
                    on_offer=self._on_offer, on_settled=self._on_settled,
                    on_cancel=self._on_cancel,
                    request_timeout_s=self.config.payer.request_timeout_s,
                )
                welcome = await client.connect()
            except ConfigError as exc:
                log_event(log, "cannot log in", logging.ERROR, payer=self.payer_id,
                          error=str(exc))
                delay = cap
            except RequestFailed as exc:
                log_event(log, "router refused the session", logging.WARNING,
                          router=self.router_addr, code=str(exc.code), reason=exc.message)
                self.suspended = exc.code == ErrorCode.PARTICIPANT_SUSPENDED
                if exc.code in SLOW_RETRY_CODES:
                    delay = cap  # a key or config mismatch; retrying fast will not help
            except TlsFailed as exc:
                log_event(log, "router not trusted", logging.ERROR, router=self.router_addr,
                          error=str(exc))
                delay = cap
            except (OSError, TimeoutError, ConnectionLost) as exc:
                log_event(log, "router not reachable", logging.WARNING,
                          router=self.router_addr, error=str(exc) or type(exc).__name__)
            else:
                delay = INITIAL_BACKOFF_S
                self.suspended = False
                await self._hold_session(client, welcome.balance)
                if self._stopping.is_set():
                    return
            log_event(log, "reconnecting", router=self.router_addr, in_s=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, cap)

    async def _hold_session(self, client: PayerClient, balance: int | None) -> None:
        self.client = client
        self.connects += 1
        self._session_up.set()
        log_event(log, "connected", router=self.router_addr, payer=self.payer_id,
                  balance=None if balance is None else format_amount(balance))
        self.emit(Event(kind="connected", peer=self.router_addr, balance=balance))
        if not self._announced:
            self._announced = True
            extra = {"metrics": self.metrics_at} if self.metrics_at else {}
            print_ready("payer", id=self.payer_id, control=self.control.path, **extra)
        self._spawn(self._resync(client), "resync")
        try:
            await self._until_stopping(client.wait_closed())
        finally:
            self._session_up.clear()
            self.client = None
        if not self._stopping.is_set():
            log_event(log, "disconnected", logging.WARNING, router=self.router_addr,
                      pending_out=len(self.outbox), pending_in=len(self.offers))
            self.emit(Event(kind="disconnected", peer=self.router_addr))
        await client.close()

    async def wait_client(self) -> PayerClient | None:
        """The live session, waiting for one; None once the daemon is stopping."""
        while not self._stopping.is_set():
            client = self.client
            if client is not None and client.connected:
                return client
            await self._until_stopping(self._session_up.wait())
            await asyncio.sleep(0)
        return None

    async def _until_stopping(self, waiting: Coroutine[Any, Any, object]) -> None:
        """Wait for `waiting` or for the daemon to start stopping, whichever comes first
        (the other is cancelled)."""
        done = asyncio.ensure_future(waiting)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({done, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            stopping.cancel()

    async def _resync(self, client: PayerClient) -> None:
        """After a (re)connect: settle or forget the offers we were left holding."""
        for key, asked_about in list(self.offers.items()):
            sender, tx_id = key
            try:
                st = await client.status(tx_id, sender=sender)
            except RequestFailed as exc:
                if exc.code != ErrorCode.NOT_FOUND:
                    continue
                state, code = "unknown", None
            except (ConnectionLost, TimeoutError):
                return
            else:
                state, code = st.state, st.code
            offer = self.offers.get(key)
            # A fresh offer for the same tx_id may have arrived while we asked (the sender
            # re-sent it to a restarted router): the answer was about the old one.
            if offer is None or offer is not asked_about or state == "pending":
                continue
            del self.offers[key]
            if state == "paid":
                log_event(log, "payment received", tx_id=tx_id, sender=offer.sender,
                          amount=format_amount(offer.amount), outcome="paid", via="status")
                self.emit(Event(kind="settled", tx_id=tx_id, peer=offer.sender,
                                amount=offer.amount, memo=offer.memo,
                                balance=client.balance.balance, seq=st.seq))
            else:
                log_event(log, "offer cancelled", tx_id=tx_id, sender=offer.sender,
                          amount=format_amount(offer.amount), code=code or state, via="status")
                self.emit(Event(kind="cancel", tx_id=tx_id, peer=offer.sender,
                                amount=offer.amount, code=code or state))

    # --- incoming ------------------------------------------------------------------

    async def _on_offer(self, offer: Offer) -> str | None:
        reason = self.policy.decide(offer.sender, offer.amount)
        if reason is not None:
            log_event(log, "offer rejected", tx_id=offer.tx_id, sender=offer.sender,
                      amount=format_amount(offer.amount), outcome="receiver_rejected",
                      reason=reason)
            self.emit(Event(kind="cancel", tx_id=offer.tx_id, peer=offer.sender,
                            amount=offer.amount, memo=offer.memo, code="receiver_rejected"))
            return reason
        self.offers[(offer.sender, offer.tx_id)] = offer
        log_event(log, "offer accepted", tx_id=offer.tx_id, sender=offer.sender,
                  amount=format_amount(offer.amount), outcome="receipt")
        self.emit(Event(kind="offer", tx_id=offer.tx_id, peer=offer.sender,
                        amount=offer.amount, memo=offer.memo))
        return None

    def keep(self, proof: KeptProof) -> None:
        """Append one receipt to the payer's receipts file (flushed; a lost one costs
        evidence, never money, so it is logged and the daemon goes on)."""
        try:
            self.receipts_path.parent.mkdir(parents=True, exist_ok=True)
            append_proof(self.receipts_path, proof)
        except OSError as exc:
            log_event(log, "receipt not kept", logging.WARNING, tx_id=proof.tx_id,
                      error=exc.strerror or str(exc))

    async def _on_settled(self, msg: Settled) -> None:
        if msg.proof is not None:
            self.keep(KeptProof.of(msg.proof, msg.tx_id, msg.sender, "settled"))
        offer = self.offers.pop((msg.sender, msg.tx_id), None)
        sender = msg.sender
        # The router says what was paid; the offer (if this daemon still has it) is the
        # fallback for a router that does not.
        amount = msg.amount if msg.amount is not None else offer.amount if offer else None
        memo = msg.memo if msg.amount is not None else offer.memo if offer else ""
        self.received += 1
        log_event(log, "payment received", tx_id=msg.tx_id, sender=sender,
                  amount=None if amount is None else format_amount(amount), outcome="settled",
                  seq=msg.seq, balance=format_amount(msg.balance))
        self.emit(Event(kind="settled", tx_id=msg.tx_id, peer=sender, amount=amount or 0,
                        memo=memo, balance=msg.balance, seq=msg.seq))

    async def _on_cancel(self, msg: Cancel) -> None:
        offer = self.offers.pop((msg.sender, msg.tx_id), None)
        amount = msg.amount if msg.amount is not None else offer.amount if offer else None
        log_event(log, "offer cancelled", tx_id=msg.tx_id, sender=msg.sender,
                  amount=None if amount is None else format_amount(amount), code=msg.code)
        self.emit(Event(kind="cancel", tx_id=msg.tx_id, peer=msg.sender, amount=amount or 0,
                        code=msg.code))

    # --- outgoing ------------------------------------------------------------------

    async def pay(self, pay: Pay) -> Paid:
        """Send `pay` (or join the same tx_id already in flight) and wait for its outcome
        up to `request_timeout_s`. Raises RequestFailed: the router's code, or
        router_unavailable (nothing sent), tx_id_conflict, shutting_down, or
        outcome_pending (no answer yet; the daemon keeps re-sending the same tx_id)."""
        entry = self.outbox.get(pay.tx_id)
        if entry is not None:
            if not entry.same_params(pay):
                raise RequestFailed(ErrorCode.TX_ID_CONFLICT,
                                    f"tx_id {pay.tx_id} is in flight with other parameters")
        else:
            if self._closing:
                raise RequestFailed(ErrorCode.SHUTTING_DOWN,
                                    f"{self.payer_id}'s daemon is stopping; nothing was sent")
            if self.client is None or not self.client.connected:
                if self.suspended:
                    raise RequestFailed(ErrorCode.PARTICIPANT_SUSPENDED,
                                        f"the router refuses {self.payer_id}'s login: the "
                                        "account is suspended by the network's operator; "
                                        "nothing was sent")
                raise RequestFailed(ErrorCode.ROUTER_UNAVAILABLE, self.no_router_text())
            fut: asyncio.Future[Paid] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume)
            entry = Outgoing(pay, fut)
            self.outbox[pay.tx_id] = entry
            entry.task = asyncio.create_task(self._drive(entry), name=f"pay:{pay.tx_id}")
        try:
            async with asyncio.timeout(self.config.payer.request_timeout_s):
                return await asyncio.shield(entry.future)
        except TimeoutError:
            raise RequestFailed(
                ErrorCode.OUTCOME_PENDING,
                f"no final answer yet for {pay.tx_id}; the daemon keeps re-sending it "
                f"(same tx_id, never paid twice); ask: status {pay.tx_id}",
            ) from None

    async def _drive(self, entry: Outgoing) -> None:
        pay = entry.pay
        fields: dict[str, Any] = {"tx_id": pay.tx_id, "receiver": pay.to, "amount": format_amount(pay.amount)}
        try:
            while True:
                client = await self.wait_client()
                if client is None:
                    entry.future.set_exception(RequestFailed(
                        ErrorCode.SHUTTING_DOWN,
                        f"{self.payer_id}'s daemon stopped before {pay.tx_id} was decided; "
                        "re-send the same tx_id to learn its outcome"))
                    return
                entry.attempts += 1
                try:
                    paid = await client.send_payment(pay)
                except RequestFailed as exc:
                    if exc.code in RETRY_CODES:
                        log_event(log, "payment not decided yet; retrying", **fields,
                                  code=str(exc.code), attempt=entry.attempts)
                        await asyncio.sleep(PENDING_RETRY_S)
                        continue
                    log_event(log, "payment", **fields, outcome="failed", code=str(exc.code),
                              reason=exc.message)
                    self.outcomes[str(exc.code)] = self.outcomes.get(str(exc.code), 0) + 1
                    self.emit(Event(kind="failed", tx_id=pay.tx_id, peer=pay.to,
                                    amount=pay.amount, memo=pay.memo, code=str(exc.code)))
                    entry.future.set_exception(exc)
                    return
                except (ConnectionLost, TimeoutError) as exc:
                    log_event(log, "payment unanswered; will re-send the same tx_id",
                              logging.WARNING, **fields, attempt=entry.attempts,
                              error=type(exc).__name__)
                    await asyncio.sleep(0.05)
                    continue
                log_event(log, "payment", **fields, outcome="paid", seq=paid.seq,
                          balance=format_amount(paid.balance))
                if paid.proof is not None:
                    self.keep(KeptProof.of(paid.proof, pay.tx_id, self.payer_id, "paid"))
                self.outcomes["paid"] = self.outcomes.get("paid", 0) + 1
                self.emit(Event(kind="paid", tx_id=pay.tx_id, peer=pay.to, amount=pay.amount,
                                memo=pay.memo, balance=paid.balance, seq=paid.seq))
                entry.future.set_result(paid)
                return
        finally:
            self.outbox.pop(pay.tx_id, None)
            if not entry.future.done():
                entry.future.set_exception(RequestFailed(
                    ErrorCode.SHUTTING_DOWN,
                    f"{self.payer_id}'s daemon stopped before {pay.tx_id} was decided; "
                    "re-send the same tx_id to learn its outcome"))

    # --- helpers for the control socket ---------------------------------------------

    def no_router_text(self) -> str:
        return (f"{self.payer_id}'s daemon has no session with the router at "
                f"{self.router_addr} (it keeps retrying); nothing was sent")

    def emit(self, event: Message) -> None:
        """Send an event to every watching CLI; a watcher that is gone is dropped."""
        for ch in list(self.watchers):
            try:
                ch.send_nowait(event)
            except ConnectionLost:
                self.watchers.discard(ch)


async def serve(config: NetworkConfig, payer_id: str, router: tuple[str, int],
                metrics_addr: str | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = PayerDaemon(config, payer_id, *router, metrics_addr=metrics_addr)
    try:
        daemon.start_metrics()
    except (OSError, ConfigError) as exc:
        print(f"jackpay-payer: metrics at {metrics_addr}: {exc}", file=sys.stderr)
        return 2
    try:
        return await daemon.run(stop)
    finally:
        if daemon._metrics_server is not None:
            daemon._metrics_server.shutdown()
