"""The payment pipeline (DESIGN §2): one task per payment, many at once on one loop.

Each step is its own named function, in this order, so hook points can be added later:

    validate → lookup (tx_id) → funds_available → receiver_exists → check_ledger_link
    → hold → ping_payer (link test) → offer → write_to_ledger → apply → notify

Rules:
- the funds check and the hold are synchronous and run with no `await` between them,
  so two payments can never spend the same money;
- a step that fails raises PaymentKilled(code); `kill_payment` then releases the hold,
  sends `cancel` to the receiver if it was offered the payment, records the failed
  outcome and tells every waiting sender request. Nothing is half done: before the
  ledger has acked, no balance has moved;
- the ledger append is the commit point. A lost answer is never guessed at (the ledger
  client re-sends it); if it stays unknown longer than `outcome_pending_after_s`, the
  waiting senders are told `outcome_pending` and the payment still ends exactly once;
- a payment runs in its own task: the sender's connection dropping does not stop it.
  A retry of the same tx_id joins the run in flight or gets the recorded outcome;
- every decision is logged once, with tx_id, sender, receiver, amount, outcome, code and
  the step that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from common.config import RouterConfig
from common.errors import ConnectionLost, ErrorCode, InvariantViolation, RequestFailed
from common.logs import log_event
from common.messages import (
    Cancel,
    LedgerRow,
    Offer,
    Pay,
    Ping,
    Pong,
    Receipt,
    Reject,
    RowIn,
    Settled,
)
from common.money import format_amount
from router.accounts import is_reserved
from router.book import Book
from router.ledger_client import (
    LedgerClient,
    LedgerRefused,
    LedgerUnavailable,
    durable_row,
    refusal_code,
)
from router.sessions import Registry
from router.transactions import TxIdConflict, TxParams, TxRecord, TxState

log = logging.getLogger("jackpay.router.payments")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a `pay` request is answered with. `code` None means paid."""

    tx_id: str
    code: ErrorCode | None = None
    message: str = ""
    seq: int | None = None
    dtg: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


class PaymentKilled(Exception):
    """A step refused the payment; carries the wire code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Payment:
    """One payment in flight (the seed's currentSender/currentRecv, per payment)."""

    def __init__(self, record: TxRecord) -> None:
        self.record = record
        self.step = "start"
        self.held = False
        self.offered = False
        self.committed = False
        self.pending_reported = False
        self.started = time.monotonic()
        self._waiters: list[asyncio.Future[Outcome]] = []

    @property
    def tx_id(self) -> str:
        return self.record.tx_id

    @property
    def params(self) -> TxParams:
        return self.record.params

    def reply_future(self, pending_after_s: float) -> asyncio.Future[Outcome]:
        """A future for one `pay` request's answer: the final outcome, or
        `outcome_pending`. No task is needed to wait for it (callbacks may).

        A request that joins after `outcome_pending` was reported waits up to
        `pending_after_s` itself before being told `outcome_pending` again.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._waiters.append(fut)
        if self.pending_reported:
            def expire() -> None:
                if not fut.done():
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                    fut.set_result(pending_outcome(self.tx_id))

            timer = loop.call_later(pending_after_s, expire)
            fut.add_done_callback(lambda _: timer.cancel())
        return fut

    async def wait_reply(self, pending_after_s: float) -> Outcome:
        """Await `reply_future`."""
        return await self.reply_future(pending_after_s)

    def report_pending(self) -> None:
        self.pending_reported = True
        self._answer(pending_outcome(self.tx_id))

    def finish(self, outcome: Outcome) -> None:
        self._answer(outcome)

    def _answer(self, outcome: Outcome) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(outcome)


def pending_outcome(tx_id: str) -> Outcome:
    return Outcome(tx_id, ErrorCode.OUTCOME_PENDING,
                   "the ledger has not answered yet; ask `status` or retry the same tx_id")


class Pipeline:
    """Runs payments against the book, the registry of sessions and the ledger."""

    def __init__(self, book: Book, registry: Registry, ledger: LedgerClient,
                 cfg: RouterConfig) -> None:
        self.book = book
        self.registry = registry
        self.ledger = ledger
        self.cfg = cfg
        self.shutting_down = False
        self.inflight: dict[str, Payment] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.counts: dict[str, int] = {}

    # --- entry point ---------------------------------------------------------------

    async def submit(self, sender: str, pay: Pay) -> Outcome:
        """Run (or join, or look up) the payment `pay` from `sender`; return the answer."""
        answer = self.begin(sender, pay)
        return answer if isinstance(answer, Outcome) else await answer

    def begin(self, sender: str, pay: Pay) -> Outcome | asyncio.Future[Outcome]:
        """`submit` without a coroutine: the answer now, or a future for it (the payment
        itself runs in its own task)."""
        params = TxParams(sender, pay.to, pay.amount, pay.memo)
        try:
            self.validate(sender, pay)
            record = self.lookup(pay.tx_id, params)
        except PaymentKilled as k:
            self._log_decision(pay.tx_id, params, k.code, "validate", k.message)
            return Outcome(pay.tx_id, k.code, k.message)
        if record is not None:
            return self._known(record)
        if self.shutting_down:
            self._log_decision(pay.tx_id, params, ErrorCode.SHUTTING_DOWN, "validate", "")
            return Outcome(pay.tx_id, ErrorCode.SHUTTING_DOWN,
                           "the router is stopping; retry the same tx_id later")
        payment = Payment(self.book.txs.begin(pay.tx_id, params))
        self.inflight[pay.tx_id] = payment
        task = asyncio.get_running_loop().create_task(self.run(payment), name=f"pay:{pay.tx_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return payment.reply_future(self.cfg.outcome_pending_after_s)

    def _known(self, record: TxRecord) -> Outcome | asyncio.Future[Outcome]:
        if record.state is TxState.PAID:
            return Outcome(record.tx_id, seq=record.seq, dtg=record.dtg)
        if record.state is TxState.FAILED:
            code = ErrorCode(record.code or ErrorCode.INTERNAL_ERROR)
            return Outcome(record.tx_id, code, f"tx_id {record.tx_id} already failed: {code.doc}")
        payment = self.inflight.get(record.tx_id)
        if payment is None:  # pending but not running: only while shutting down
            return pending_outcome(record.tx_id)
        return payment.reply_future(self.cfg.outcome_pending_after_s)

    # --- step 2: validate and look up ------------------------------------------------

    def validate(self, sender: str, pay: Pay) -> None:
        """Raises PaymentKilled: bad_request (to self, reserved tx_id), unknown_receiver
        (a reserved account such as `_issuer`)."""
        if pay.to == sender:
            raise PaymentKilled(ErrorCode.BAD_REQUEST, "a payer cannot pay itself")
        if pay.tx_id.startswith("_"):
            raise PaymentKilled(ErrorCode.BAD_REQUEST, "tx_ids starting with `_` are reserved")
        if is_reserved(pay.to):
            raise PaymentKilled(ErrorCode.UNKNOWN_RECEIVER, f"{pay.to} is a reserved account")

    def lookup(self, tx_id: str, params: TxParams) -> TxRecord | None:
        """The known record for tx_id, if any. Raises PaymentKilled(tx_id_conflict)."""
        try:
            return self.book.txs.lookup(tx_id, params)
        except TxIdConflict:
            raise PaymentKilled(ErrorCode.TX_ID_CONFLICT,
                                f"tx_id {tx_id} was already used for another payment") from None

    # --- the run ---------------------------------------------------------------------

    async def run(self, p: Payment) -> None:
        try:
            try:
                await self.steps(p)
            except PaymentKilled as k:
                self.kill_payment(p, k.code, k.message)
            except asyncio.CancelledError:
                if not p.committed:
                    self._abandon(p)
                raise
            except Exception as exc:
                if p.committed:
                    log.exception("payment %s failed after its commit", p.tx_id)
                else:
                    log.exception("payment %s failed at step %s", p.tx_id, p.step)
                    self.kill_payment(p, ErrorCode.INTERNAL_ERROR,
                                      f"internal error at step {p.step}: {type(exc).__name__}")
        finally:
            self.inflight.pop(p.tx_id, None)

    async def steps(self, p: Payment) -> None:
        # Steps 3-5 are synchronous: no await between the funds check and the hold.
        p.step = "funds"
        self.check_funds(p)
        p.step = "receiver"
        self.check_receiver(p)
        p.step = "ledger_link"
        self.check_ledger_link(p)
        p.step = "hold"
        self.hold(p)
        p.step = "link"
        await self.test_receiver_link(p)
        p.step = "offer"
        await self.offer(p)
        p.step = "append"
        row = await self.write_to_ledger(p)
        p.step = "apply"
        self.apply(p, row)
        p.step = "notify"
        await self.notify(p, row)

    def check_funds(self, p: Payment) -> None:
        """Step 3 (seed: fundsAvail). Raises PaymentKilled(insufficient_funds)."""
        if not self.book.accounts.funds_available(p.params.sender, p.params.amount):
            raise PaymentKilled(ErrorCode.INSUFFICIENT_FUNDS,
                                f"{p.params.sender} has "
                                f"{format_amount(self.book.accounts.available(p.params.sender))}"
                                f" available, below {format_amount(p.params.amount)}")

    def check_receiver(self, p: Payment) -> None:
        """Step 4 (seed: receiverExists). Raises PaymentKilled(unknown_receiver)."""
        if not self.registry.receiver_exists(p.params.receiver):
            raise PaymentKilled(ErrorCode.UNKNOWN_RECEIVER,
                                f"{p.params.receiver} is not a participant of this network")

    def check_ledger_link(self, p: Payment) -> None:
        """Refuse early, before anyone is offered anything, while the ledger is away."""
        if not self.ledger.connected:
            raise PaymentKilled(ErrorCode.LEDGER_UNAVAILABLE,
                                f"the ledger at {self.ledger.address} is not reachable")

    def hold(self, p: Payment) -> None:
        """Step 5: reserve the amount (checked just above, in the same loop turn)."""
        self.book.accounts.place_hold(p.params.sender, p.params.amount)
        p.held = True

    async def ping_payer(self, payer_id: str) -> bool:
        """The seed's pingPayer: a live session that showed life within the freshness
        window, else a ping answered within `ping_timeout_s`."""
        session = self.registry.session(payer_id)
        if session is None:
            return False
        if time.monotonic() - session.channel.last_seen <= self.cfg.freshness_window_s:
            return True
        try:
            reply = await session.channel.request(Ping(id=0), timeout=self.cfg.ping_timeout_s)
        except (TimeoutError, ConnectionLost, RequestFailed):
            return False
        return isinstance(reply, Pong)

    async def test_receiver_link(self, p: Payment) -> None:
        """Step 6. Raises PaymentKilled(receiver_unreachable)."""
        if not await self.ping_payer(p.params.receiver):
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{p.params.receiver} has no live session or missed a ping")

    async def offer(self, p: Payment) -> None:
        """Step 7: offer → receipt. Raises PaymentKilled(receiver_timeout | _rejected |
        _unreachable)."""
        session = self.registry.session(p.params.receiver)
        if session is None:
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{p.params.receiver} disconnected before the offer")
        offer = Offer(id=0, tx_id=p.tx_id, sender=p.params.sender, amount=p.params.amount,
                      memo=p.params.memo)
        p.offered = True
        try:
            reply = await session.channel.request(offer, timeout=self.cfg.offer_timeout_s)
        except TimeoutError:
            raise PaymentKilled(ErrorCode.RECEIVER_TIMEOUT,
                                f"{p.params.receiver} did not answer the offer in "
                                f"{self.cfg.offer_timeout_s}s") from None
        except ConnectionLost:
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{p.params.receiver} disconnected during the offer") from None
        except RequestFailed as exc:
            raise PaymentKilled(ErrorCode.RECEIVER_REJECTED,
                                f"{p.params.receiver} answered the offer with {exc}") from None
        if isinstance(reply, Reject):
            raise PaymentKilled(ErrorCode.RECEIVER_REJECTED,
                                reply.reason or f"{p.params.receiver} rejected the payment")
        if not isinstance(reply, Receipt) or reply.tx_id != p.tx_id:
            raise PaymentKilled(ErrorCode.RECEIVER_REJECTED,
                                f"{p.params.receiver} answered the offer with a wrong receipt")

    async def write_to_ledger(self, p: Payment) -> LedgerRow:
        """Step 8 (seed: writeToLedger), the commit point. Raises PaymentKilled
        (ledger_unavailable | ledger_write_failed | tx_id_conflict) only when the ledger
        definitely did not write the row; an unknown outcome is waited out."""
        params = p.params
        row_in = RowIn(tx_id=p.tx_id, sender=params.sender, receiver=params.receiver,
                       amount=params.amount, memo=params.memo)
        fut = self.ledger.append(row_in)

        def pending() -> None:
            if fut.done():
                return
            log_event(log, "payment outcome pending", logging.WARNING, tx_id=p.tx_id,
                      sender=params.sender, receiver=params.receiver,
                      amount=params.amount, step="append")
            p.report_pending()

        # One timer rather than wait_for(shield(...)): the append future is never
        # cancelled by the wait, and the hot path creates no extra task.
        timer = asyncio.get_running_loop().call_later(self.cfg.outcome_pending_after_s,
                                                      pending)
        try:
            result = await fut
        except LedgerUnavailable as exc:
            raise PaymentKilled(ErrorCode.LEDGER_UNAVAILABLE, str(exc)) from None
        except LedgerRefused as exc:
            raise PaymentKilled(refusal_code(exc), f"the ledger refused the row: {exc}") from None
        finally:
            timer.cancel()
        if result.status == "conflict":
            raise PaymentKilled(ErrorCode.TX_ID_CONFLICT,
                                f"the ledger has tx_id {p.tx_id} for another payment")
        return durable_row(row_in, result)

    def apply(self, p: Payment, row: LedgerRow) -> None:
        """Step 9: move the money and release the hold; tell the waiting senders."""
        p.committed = True
        self.book.commit(row)
        p.held = False
        self._log_decision(p.tx_id, p.params, None, "done", "", seq=row.seq,
                           ms=round((time.monotonic() - p.started) * 1000, 1))
        p.finish(Outcome(p.tx_id, seq=row.seq, dtg=row.dtg))

    async def notify(self, p: Payment, row: LedgerRow) -> None:
        """Step 10: `settled` to the receiver, waiting for its ack. A failure here
        changes nothing: the payment is in the ledger; the receiver resyncs later."""
        session = self.registry.session(p.params.receiver)
        if session is None:
            log_event(log, "receiver gone before settled", tx_id=p.tx_id,
                      receiver=p.params.receiver)
            return
        msg = Settled(id=0, tx_id=p.tx_id, seq=row.seq,
                      balance=self.book.accounts.balance(p.params.receiver))
        try:
            await session.channel.request(msg, timeout=self.cfg.settle_timeout_s)
        except (TimeoutError, ConnectionLost, RequestFailed) as exc:
            log_event(log, "receiver did not ack settled", logging.WARNING, tx_id=p.tx_id,
                      receiver=p.params.receiver, error=str(exc) or type(exc).__name__)

    # --- ending a payment that failed ----------------------------------------------

    def kill_payment(self, p: Payment, reason: ErrorCode, message: str) -> None:
        """The seed's killPayment: release the hold, cancel the receiver's offer, record
        the failure and tell the sender. Raises InvariantViolation after a commit."""
        if p.committed:
            raise InvariantViolation(f"kill_payment({p.tx_id}) after its commit")
        if p.held:
            self.book.accounts.release_hold(p.params.sender, p.params.amount)
            p.held = False
        if p.offered:
            self._send_cancel(p, reason)
        self.book.txs.mark_failed(p.tx_id, reason.value)
        self._log_decision(p.tx_id, p.params, reason, p.step, message)
        p.finish(Outcome(p.tx_id, reason, message))

    def _abandon(self, p: Payment) -> None:
        """Cancelled at shutdown before the commit: give the hold back (a restart would
        forget it anyway) and leave the tx pending; a replay tells its fate later."""
        if p.held:
            self.book.accounts.release_hold(p.params.sender, p.params.amount)
            p.held = False
        log_event(log, "payment abandoned at shutdown", logging.WARNING, tx_id=p.tx_id,
                  step=p.step)

    def _send_cancel(self, p: Payment, reason: ErrorCode) -> None:
        session = self.registry.session(p.params.receiver)
        if session is None:
            return
        channel = session.channel

        async def send() -> None:
            try:
                await channel.request(Cancel(id=0, tx_id=p.tx_id, code=reason.value),
                                      timeout=self.cfg.settle_timeout_s)
            except (TimeoutError, ConnectionLost, RequestFailed) as exc:
                log_event(log, "receiver did not ack cancel", tx_id=p.tx_id,
                          receiver=p.params.receiver, error=str(exc) or type(exc).__name__)

        task = asyncio.get_running_loop().create_task(send(), name=f"cancel:{p.tx_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- lifecycle -----------------------------------------------------------------

    async def drain(self, grace_s: float) -> int:
        """Refuse new payments, wait up to `grace_s` for those in flight, cancel the rest.
        Returns how many were cancelled."""
        self.shutting_down = True
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
        else:
            pending = set()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        background = set(self._background)
        if background:
            await asyncio.wait(background, timeout=min(grace_s, self.cfg.settle_timeout_s))
        return len(pending)

    def _log_decision(self, tx_id: str, params: TxParams, code: ErrorCode | None, step: str,
                      message: str, **extra: Any) -> None:
        outcome = "paid" if code is None else "failed"
        key = outcome if code is None else code.value
        self.counts[key] = self.counts.get(key, 0) + 1
        log_event(log, "payment", tx_id=tx_id, sender=params.sender, receiver=params.receiver,
                  amount=params.amount, outcome=outcome, code=None if code is None else code.value,
                  step=None if code is None else step, reason=message or None, **extra)
