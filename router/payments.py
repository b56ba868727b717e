"""The payment pipeline (DESIGN §2): many payments at once on one loop, each a chain of
steps driven by callbacks (no task per payment).

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
- a payment runs on its own (the offer's reply and the append's answer drive it): the
  sender's connection dropping does not stop it.
  A retry of the same tx_id joins the run in flight or gets the recorded outcome;
- a payment is named by (sender, tx_id): two payers may use the same tx_id;
- a sender has at most `payer_max_in_flight` payments running; a new one above that is
  answered `rate_limited` and leaves no trace (a retry of the same tx_id simply runs);
- every decision is logged once, with tx_id, sender, receiver, amount, outcome, code and
  the step that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from common.config import RouterConfig
from common.errors import ConnectionLost, ErrorCode, InvariantViolation, RequestFailed
from common.logs import log_event
from common.messages import (
    AppendResult,
    Cancel,
    Message,
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
    refusal_code,
)
from router.sessions import Registry
from router.transactions import TxIdConflict, TxParams, TxRecord, TxState

log = logging.getLogger("jackpay.router.payments")


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What a `pay` request is answered with. `code` None means paid."""

    tx_id: str
    code: ErrorCode | None = None
    message: str = ""
    seq: int | None = None
    dtg: str | None = None


# How a `pay` request is answered: called once with its outcome (or `outcome_pending`).
Reply = Callable[[Outcome], None]


class PaymentKilled(Exception):
    """A step refused the payment; carries the wire code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _LateJoiner:
    """The reply of a request that joined after `outcome_pending` was reported: it is
    told `outcome_pending` again if the payment has not ended within its own wait."""

    __slots__ = ("reply", "timer")

    def __init__(self, reply: Reply) -> None:
        self.reply: Reply | None = reply
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, outcome: Outcome) -> None:
        reply, self.reply = self.reply, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if reply is not None:
            reply(outcome)


class Payment:
    """One payment in flight (the seed's currentSender/currentRecv, per payment): its
    parameters, how far it got, and the replies waiting for its outcome."""

    __slots__ = ("_replies", "amount", "committed", "ended", "held", "memo", "offered",
                 "pending_reported", "receiver", "record", "sender", "started", "step", "tx_id")

    def __init__(self, record: TxRecord) -> None:
        self.record = record
        params = record.params
        self.tx_id = record.tx_id
        self.sender = params.sender
        self.receiver = params.receiver
        self.amount = params.amount
        self.memo = params.memo
        self.step = "start"
        self.held = False
        self.offered = False
        self.committed = False
        self.pending_reported = False
        self.started = time.monotonic()
        self.ended = False  # finished, failed or abandoned: late callbacks are ignored
        self._replies: list[Reply] = []

    @property
    def params(self) -> TxParams:
        return self.record.params

    def add_reply(self, reply: Reply, pending_after_s: float) -> None:
        """`reply` is called once with the final outcome, or `outcome_pending`.

        A request that joins after `outcome_pending` was reported waits up to
        `pending_after_s` itself before being told `outcome_pending` again.
        """
        if not self.pending_reported:
            self._replies.append(reply)
            return
        joiner = _LateJoiner(reply)
        self._replies.append(joiner)

        def expire() -> None:
            joiner.timer = None
            with contextlib.suppress(ValueError):
                self._replies.remove(joiner)
            joiner(pending_outcome(self.tx_id))

        joiner.timer = asyncio.get_running_loop().call_later(pending_after_s, expire)

    def report_pending(self) -> None:
        self.pending_reported = True
        self._answer(pending_outcome(self.tx_id))

    def finish(self, outcome: Outcome) -> None:
        self._answer(outcome)

    def _answer(self, outcome: Outcome) -> None:
        replies, self._replies = self._replies, []
        for reply in replies:
            try:
                reply(outcome)
            except Exception:  # one sender's broken reply must not stop the payment
                log.exception("answering pay %s failed", self.tx_id)


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
        self.inflight: dict[tuple[str, str], Payment] = {}  # by (sender, tx_id)
        self.running_by_sender: dict[str, int] = {}
        self._idle: asyncio.Event | None = None  # set when `inflight` empties (drain)
        # Appends awaiting the ledger, by `outcome_pending` deadline; one timer for all.
        self._appending: deque[tuple[float, Payment, asyncio.Future[AppendResult]]] = deque()
        self._pending_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._unacked = 0  # `settled` frames whose ack has not come (nor failed) yet
        self._all_acked: asyncio.Event | None = None  # made by `drain`
        self.counts: dict[str, int] = {}

    # --- entry point ---------------------------------------------------------------

    def begin(self, sender: str, pay: Pay, reply: Reply) -> Outcome | None:
        """Run (or join, or look up) the payment `pay` from `sender`.

        Returns the outcome when it is known now; otherwise None, and `reply` is called
        once later with the outcome (or `outcome_pending`). A new payment's synchronous
        steps run now; replies and the ledger's answer drive the rest."""
        tx_id = pay.tx_id
        params = TxParams(sender, pay.to, pay.amount, pay.memo)
        try:
            self.validate(sender, pay)
            record = self.lookup(tx_id, params)
        except PaymentKilled as k:
            self._log_failure(tx_id, params, k.code, "validate", k.message)
            return Outcome(tx_id, k.code, k.message)
        if record is not None:
            return self._known(record, reply)
        if self.shutting_down:
            self._log_failure(tx_id, params, ErrorCode.SHUTTING_DOWN, "validate", "")
            return Outcome(tx_id, ErrorCode.SHUTTING_DOWN,
                           "the router is stopping; retry the same tx_id later")
        running = self.running_by_sender.get(sender, 0)
        if running >= self.cfg.payer_max_in_flight:
            return Outcome(tx_id, ErrorCode.RATE_LIMITED,
                           f"{running} payments of yours are in flight (the limit); retry "
                           "the same tx_id when one has ended")
        self.running_by_sender[sender] = running + 1
        payment = Payment(self.book.txs.begin(tx_id, params))
        self.inflight[(sender, tx_id)] = payment
        payment._replies.append(reply)
        self._guard(payment, self.steps)
        return None

    def _known(self, record: TxRecord, reply: Reply) -> Outcome | None:
        if record.state is TxState.PAID:
            return Outcome(record.tx_id, seq=record.seq, dtg=record.dtg)
        if record.state is TxState.FAILED:
            code = ErrorCode(record.code or ErrorCode.INTERNAL_ERROR)
            return Outcome(record.tx_id, code, f"tx_id {record.tx_id} already failed: {code.doc}")
        payment = self.inflight.get((record.params.sender, record.tx_id))
        if payment is None:  # pending but not running: only while shutting down
            return pending_outcome(record.tx_id)
        payment.add_reply(reply, self.cfg.outcome_pending_after_s)
        return None

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

    # A payment is a chain of steps driven by callbacks (a reply, the append's future),
    # not a task: `steps` runs the synchronous steps 3-7 and sends the offer; the offer's
    # answer runs `offer_answered`, which sends the append; the append's answer runs
    # `appended` (apply, notify). Each runs under `_guard`, which turns PaymentKilled
    # into `kill_payment` and ends the payment exactly once.

    def _guard(self, p: Payment, step: Callable[..., None], *args: Any) -> None:
        if p.ended:  # abandoned at shutdown: what comes back now changes nothing
            return
        try:
            step(p, *args)
        except PaymentKilled as k:
            self._fail(p, k.code, k.message)
        except Exception as exc:
            if p.committed:
                log.exception("payment %s failed after its commit", p.tx_id)
                rec = p.record  # the money moved: the senders still waiting hear `paid`
                if rec.state is TxState.PAID and rec.seq is not None:
                    p.finish(Outcome(p.tx_id, seq=rec.seq, dtg=rec.dtg))
                else:
                    p.finish(Outcome(p.tx_id, ErrorCode.INTERNAL_ERROR,
                                     f"internal error after the commit at step {p.step}"))
                self._end(p)
            else:
                log.exception("payment %s failed at step %s", p.tx_id, p.step)
                self._fail(p, ErrorCode.INTERNAL_ERROR,
                           f"internal error at step {p.step}: {type(exc).__name__}")

    def _fail(self, p: Payment, code: ErrorCode, message: str) -> None:
        try:
            self.kill_payment(p, code, message)
        finally:
            self._end(p)

    def _end(self, p: Payment) -> None:
        p.ended = True
        inflight = self.inflight
        if inflight.pop((p.sender, p.tx_id), None) is not None:
            running = self.running_by_sender
            n = running[p.sender] - 1
            if n:
                running[p.sender] = n
            else:
                del running[p.sender]
        if not inflight and self._idle is not None:
            self._idle.set()

    def steps(self, p: Payment) -> None:
        # Steps 3-5 are synchronous: nothing runs between the funds check and the hold.
        p.step = "funds"
        self.check_funds(p)
        p.step = "receiver"
        self.check_receiver(p)
        p.step = "ledger_link"
        self.check_ledger_link(p)
        p.step = "hold"
        self.hold(p)
        p.step = "link"
        self.ping_payer(p)  # goes on with `offer` (now, or when a ping answers)

    def check_funds(self, p: Payment) -> None:
        """Step 3 (seed: fundsAvail). Raises PaymentKilled(insufficient_funds)."""
        accounts = self.book.accounts
        if not accounts.funds_available(p.sender, p.amount):
            raise PaymentKilled(ErrorCode.INSUFFICIENT_FUNDS,
                                f"{p.sender} has {format_amount(accounts.available(p.sender))}"
                                f" available, below {format_amount(p.amount)}")

    def check_receiver(self, p: Payment) -> None:
        """Step 4 (seed: receiverExists). Raises PaymentKilled(unknown_receiver)."""
        if not self.registry.receiver_exists(p.receiver):
            raise PaymentKilled(ErrorCode.UNKNOWN_RECEIVER,
                                f"{p.receiver} is not a participant of this network")

    def check_ledger_link(self, p: Payment) -> None:
        """Refuse early, before anyone is offered anything, while the ledger is away."""
        if not self.ledger.connected:
            raise PaymentKilled(ErrorCode.LEDGER_UNAVAILABLE,
                                f"the ledger at {self.ledger.address} is not reachable")

    def hold(self, p: Payment) -> None:
        """Step 5: reserve the amount (checked just above, in the same loop turn)."""
        self.book.accounts.place_hold(p.sender, p.amount)
        p.held = True

    def ping_payer(self, p: Payment) -> None:
        """Step 6 (the seed's pingPayer on the receiver): a live session that showed life
        within the freshness window goes straight on to `offer`; else a ping answered
        within `ping_timeout_s` does. Raises PaymentKilled(receiver_unreachable)."""
        session = self.registry.session(p.receiver)
        if session is not None:
            ch = session.channel
            if time.monotonic() - ch.last_seen <= self.cfg.freshness_window_s:
                p.step = "offer"
                self.offer(p)
                return

            def ponged(reply: Message | BaseException) -> None:
                self._guard(p, self._after_ping, reply)

            with contextlib.suppress(ConnectionLost):
                ch.request_nowait(Ping(id=0), self.cfg.ping_timeout_s, ponged)
                return
        raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                            f"{p.receiver} has no live session or missed a ping")

    def _after_ping(self, p: Payment, reply: Message | BaseException) -> None:
        if isinstance(reply, BaseException) and not isinstance(
                reply, TimeoutError | ConnectionLost | RequestFailed):
            raise reply
        if not isinstance(reply, Pong):
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{p.receiver} has no live session or missed a ping")
        p.step = "offer"
        self.offer(p)

    def offer(self, p: Payment) -> None:
        """Step 7: send the offer; its answer (receipt, reject, error, timeout, lost
        connection) runs `offer_answered`. Raises PaymentKilled(receiver_unreachable)."""
        session = self.registry.session(p.receiver)
        if session is None:
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{p.receiver} disconnected before the offer")
        ch = session.channel
        if ch.closed:
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{p.receiver} disconnected during the offer")
        rid = ch.next_id()
        ch.send_nowait(Offer(id=rid, tx_id=p.tx_id, sender=p.sender, amount=p.amount,
                             memo=p.memo))
        p.offered = True

        def answered(reply: Message | BaseException) -> None:
            self._guard(p, self.offer_answered, reply)

        ch.expect_reply(rid, self.cfg.offer_timeout_s, answered)

    def offer_answered(self, p: Payment, reply: Message | BaseException) -> None:
        """Step 7's answer: a receipt goes on to `write_to_ledger`. Raises PaymentKilled
        (receiver_timeout | _rejected | _unreachable)."""
        if type(reply) is Receipt and reply.tx_id == p.tx_id:  # the common case first
            p.step = "append"
            self.write_to_ledger(p)
            return
        receiver = p.receiver
        if isinstance(reply, TimeoutError):
            raise PaymentKilled(ErrorCode.RECEIVER_TIMEOUT,
                                f"{receiver} did not answer the offer in "
                                f"{self.cfg.offer_timeout_s}s")
        if isinstance(reply, ConnectionLost):
            raise PaymentKilled(ErrorCode.RECEIVER_UNREACHABLE,
                                f"{receiver} disconnected during the offer")
        if isinstance(reply, RequestFailed):
            raise PaymentKilled(ErrorCode.RECEIVER_REJECTED,
                                f"{receiver} answered the offer with {reply}")
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Reject):
            raise PaymentKilled(ErrorCode.RECEIVER_REJECTED,
                                reply.reason or f"{receiver} rejected the payment")
        raise PaymentKilled(ErrorCode.RECEIVER_REJECTED,
                            f"{receiver} answered the offer with a wrong receipt")

    def write_to_ledger(self, p: Payment) -> None:
        """Step 8 (seed: writeToLedger), the commit point: queue the row; the ledger's
        answer runs `appended`. An unknown outcome is waited out: after
        `outcome_pending_after_s` the waiting senders are told `outcome_pending`, and the
        payment still ends exactly once, when the ledger answers."""
        fut = self.ledger.append(RowIn(tx_id=p.tx_id, sender=p.sender, receiver=p.receiver,
                                       amount=p.amount, memo=p.memo))
        # The append future is never cancelled by the wait. Its `outcome_pending`
        # deadline shares one timer with every other append's (`_check_pending`).
        queue = self._appending
        while queue and (queue[0][2].done() or queue[0][1].ended):
            queue.popleft()  # answered: keep the queue to the appends still in flight
        queue.append((time.monotonic() + self.cfg.outcome_pending_after_s, p, fut))
        if self._pending_timer is None:
            self._pending_timer = asyncio.get_running_loop().call_later(
                self.cfg.outcome_pending_after_s, self._check_pending)
        fut.add_done_callback(lambda f: self._guard(p, self.appended, f))

    def _check_pending(self) -> None:
        """Tell the senders of every append unanswered for `outcome_pending_after_s`
        that its outcome is pending. The deadlines are queued in order (one delay)."""
        self._pending_timer = None
        queue = self._appending
        now = time.monotonic()
        while queue and (queue[0][0] <= now or queue[0][2].done() or queue[0][1].ended):
            _, p, fut = queue.popleft()
            if fut.done() or p.ended:
                continue
            log_event(log, "payment outcome pending", logging.WARNING, tx_id=p.tx_id,
                      sender=p.sender, receiver=p.receiver, amount=format_amount(p.amount),
                      step="append")
            p.report_pending()
        if queue:
            self._pending_timer = asyncio.get_running_loop().call_later(
                max(0.0, queue[0][0] - now), self._check_pending)

    def appended(self, p: Payment, fut: asyncio.Future[AppendResult]) -> None:
        """Step 8's answer. Raises PaymentKilled (ledger_unavailable | ledger_write_failed
        | tx_id_conflict) only when the ledger definitely did not write the row."""
        if fut.cancelled():  # the ledger client was closed under it: the outcome is unknown
            if not p.committed:
                self._abandon(p)
            self._end(p)
            return
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, LedgerUnavailable):
                raise PaymentKilled(ErrorCode.LEDGER_UNAVAILABLE, str(exc))
            if isinstance(exc, LedgerRefused):
                raise PaymentKilled(refusal_code(exc), f"the ledger refused the row: {exc}")
            raise exc
        result = fut.result()
        if result.status == "conflict":
            raise PaymentKilled(ErrorCode.TX_ID_CONFLICT,
                                f"the ledger has tx_id {p.tx_id} for another payment")
        # `written` or `duplicate`: the row is durable with this seq and dtg.
        p.step = "apply"
        self.apply(p, result.seq, result.dtg)
        p.step = "notify"
        self.notify(p, result.seq)
        self._end(p)

    def apply(self, p: Payment, seq: int, dtg: str) -> None:
        """Step 9: move the money and release the hold; tell the waiting senders."""
        p.committed = True
        self.book.commit(p.tx_id, p.sender, p.receiver, p.amount, seq, dtg)
        p.held = False
        counts = self.counts
        counts["paid"] = counts.get("paid", 0) + 1
        log_event(log, "payment", tx_id=p.tx_id, sender=p.sender, receiver=p.receiver,
                  amount=format_amount(p.amount), outcome="paid", seq=seq,
                  ms=round((time.monotonic() - p.started) * 1000, 1))
        p.finish(Outcome(p.tx_id, seq=seq, dtg=dtg))

    def notify(self, p: Payment, seq: int) -> None:
        """Step 10: `settled` to the receiver; its ack is waited for by the channel (a
        callback and a shared deadline, no future or task), so the payment ends here.
        A failure changes nothing: the payment is in the ledger; the receiver
        resyncs later. `drain` still waits for the acks outstanding at shutdown."""
        receiver = p.receiver
        session = self.registry.session(receiver)
        if session is None or session.channel.closed:
            log_event(log, "receiver gone before settled", tx_id=p.tx_id, receiver=receiver)
            return
        ch = session.channel
        tx_id = p.tx_id

        def acked(reply: Message | BaseException) -> None:
            self._unacked -= 1
            if self._unacked == 0 and self._all_acked is not None:
                self._all_acked.set()
            if isinstance(reply, BaseException):
                log_event(log, "receiver did not ack settled", logging.WARNING, tx_id=tx_id,
                          receiver=receiver, error=str(reply) or type(reply).__name__)

        rid = ch.next_id()
        ch.send_nowait(Settled(id=rid, tx_id=tx_id, sender=p.sender, seq=seq,
                               balance=self.book.accounts.balance(receiver)))
        self._unacked += 1
        ch.expect_reply(rid, self.cfg.settle_timeout_s, acked)

    # --- ending a payment that failed ----------------------------------------------

    def kill_payment(self, p: Payment, reason: ErrorCode, message: str) -> None:
        """The seed's killPayment: release the hold, cancel the receiver's offer, record
        the failure and tell the sender. Raises InvariantViolation after a commit."""
        if p.committed:
            raise InvariantViolation(f"kill_payment({p.tx_id}) after its commit")
        try:
            if p.held:
                self.book.accounts.release_hold(p.sender, p.amount)
                p.held = False
            self.book.txs.mark_failed(p.sender, p.tx_id, reason.value)
            self._log_failure(p.tx_id, p.params, reason, p.step, message)
            if p.offered:
                self._send_cancel(p, reason)
        finally:  # whatever failed above, the waiting senders hear why the payment ended
            p.finish(Outcome(p.tx_id, reason, message))

    def _abandon(self, p: Payment) -> None:
        """Cancelled at shutdown before the commit: give the hold back (a restart would
        forget it anyway) and leave the tx pending; a replay tells its fate later. The
        waiting senders are told `outcome_pending` (ask `status`, or retry the tx_id)."""
        if p.held:
            self.book.accounts.release_hold(p.sender, p.amount)
            p.held = False
        log_event(log, "payment abandoned at shutdown", logging.WARNING, tx_id=p.tx_id,
                  step=p.step)
        p.report_pending()

    def _send_cancel(self, p: Payment, reason: ErrorCode) -> None:
        session = self.registry.session(p.receiver)
        if session is None:
            return
        channel = session.channel
        receiver = p.receiver

        async def send() -> None:
            try:
                await channel.request(Cancel(id=0, tx_id=p.tx_id, sender=p.sender,
                                             code=reason.value),
                                      timeout=self.cfg.settle_timeout_s)
            except (TimeoutError, ConnectionLost, RequestFailed) as exc:
                log_event(log, "receiver did not ack cancel", tx_id=p.tx_id,
                          receiver=receiver, error=str(exc) or type(exc).__name__)

        task = asyncio.get_running_loop().create_task(send(), name=f"cancel:{p.tx_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- lifecycle -----------------------------------------------------------------

    async def drain(self, grace_s: float) -> int:
        """Refuse new payments, wait up to `grace_s` for those in flight, abandon the rest
        (hold released, tx left pending: a replay tells its fate). Returns how many were
        abandoned."""
        self.shutting_down = True
        if self.inflight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        left = [p for p in self.inflight.values() if not p.ended]
        for p in left:
            if not p.committed:
                self._abandon(p)
            self._end(p)
        background = set(self._background)
        if background:
            await asyncio.wait(background, timeout=min(grace_s, self.cfg.settle_timeout_s))
        if self._unacked:  # settled frames still waiting for their ack
            self._all_acked = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_acked.wait(),
                                       timeout=min(grace_s, self.cfg.settle_timeout_s))
        return len(left)

    def _log_failure(self, tx_id: str, params: TxParams, code: ErrorCode, step: str,
                     message: str) -> None:
        """The decision line of a payment that failed (`apply` logs the paid ones)."""
        key = code.value
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        log_event(log, "payment", tx_id=tx_id, sender=params.sender, receiver=params.receiver,
                  amount=format_amount(params.amount), outcome="failed", code=key, step=step,
                  reason=message or None)
