"""The payment pipeline's shell (DESIGN §2): many payments at once on one loop, no task
per payment. What a payment may do next is decided by the pure core
(router/payment_core.py); this module feeds it events and carries out its actions.

    validate → plug-ins validate → route (legs) → lookup (sender, tx_id) → admitted
    → [core] funds, receiver, ledger link, hold → link test → offer → append → commit
    → answer → settled

Rules:
- the core's checks and the hold run in one call, in one loop turn: two payments can
  never spend the same money;
- an action that raises is logged; before the commit the payment then fails with
  `internal_error` (nothing moved), after it the remaining actions still run (the money
  moved: the senders hear `paid`);
- a payment runs on its own (the offer's reply and the append's answer drive it): the
  sender's connection dropping does not stop it. A retry of the same tx_id joins the run
  in flight or gets the recorded outcome;
- a payment is named by (sender, tx_id): two payers may use the same tx_id;
- a sender has at most `payer_max_in_flight` payments running; a new one above that is
  answered `rate_limited` and leaves no trace (a retry of the same tx_id simply runs);
- plug-ins (router/plugins.py) veto, route into legs and ask for system payments, which
  run here like any other; a plug-in that raises fails its payment with `plugin_failed`;
- every decision is logged once, with tx_id, sender, the main leg's receiver (for a mixed
  payment the pool, never the payee), amount, outcome, code and the step that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from common.config import RouterConfig
from common.errors import ConnectionLost, ErrorCode, InvariantViolation, JackPayError, RequestFailed
from common.logs import log_event
from common.messages import (
    AppendResult,
    Cancel,
    LedgerProof,
    LedgerRow,
    Message,
    Offer,
    Pay,
    Ping,
    Pong,
    Receipt,
    Reject,
    RowIn,
    Seal,
    Settled,
)
from common.metrics import Histogram
from common.money import format_amount
from router.accounts import is_reserved
from router.book import Book
from router.ledger_client import (
    LedgerClient,
    LedgerRefused,
    LedgerUnavailable,
    refusal_code,
)
from router.payment_core import (
    TABLE,
    Abandon,
    Action,
    Answer,
    AppendRows,
    Begin,
    CancelOffer,
    Commit,
    Core,
    Crashed,
    Done,
    Event,
    Hold,
    IllegalTransition,
    LedgerAnswer,
    LedgerAnswered,
    Leg,
    Link,
    OfferAnswer,
    OfferAnswered,
    Outcome,
    PendingDue,
    Phase,
    PingAnswered,
    RecordFailure,
    Release,
    ReportPending,
    SendOffer,
    SendPing,
    Settle,
    StartPendingClock,
    handle,
    pending_outcome,
)
from router.plugins import (
    PaymentRequest,
    PluginFailed,
    Plugins,
    Route,
    no_plugins,
    route_problem,
)
from router.sessions import Registry
from router.signatures import PaymentSignatures
from router.transactions import TxIdConflict, TxParams, TxRecord, TxState

__all__ = ["Outcome", "Payment", "Pipeline", "Reply", "pending_outcome"]

log = logging.getLogger("jackpay.router.payments")

# How a `pay` request is answered: called once with its outcome (or `outcome_pending`).
Reply = Callable[[Outcome], None]



class PaymentKilled(JackPayError):
    """A check before the run refused the payment; carries the wire code."""

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


class Payment(Core):
    """One payment in flight: the core's state (phase, legs, holds: what `handle` reads
    and moves), plus what only the shell needs — the request and route it came from, its
    transaction record and the replies waiting for its outcome."""

    __slots__ = ("_replies", "deferred", "mark", "maybe_old", "record", "request", "route",
                 "started")

    def __init__(self, record: TxRecord, request: PaymentRequest, route: Route) -> None:
        legs = route.legs
        main = legs[-1]
        super().__init__(record.tx_id, main.sender, main.receiver, main.amount, legs,
                         route.payee)
        self.record = record
        self.request = request
        self.route = route
        self.started = time.monotonic()
        self.mark = 0.0  # when the step being timed began (metrics: offer, append)
        self._replies: list[Reply] = []
        # Begun after the router started from the ledger's balances with a tx_id it did
        # not know: it may be an older payment, so a failure is checked at the ledger
        # before it is recorded and answered (`Pipeline._record_failure`).
        self.maybe_old = False
        self.deferred: list[RecordFailure | Answer] | None = None

    @property
    def ended(self) -> bool:
        return self.phase in (Phase.PAID, Phase.FAILED, Phase.ABANDONED)

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

    def answer(self, outcome: Outcome) -> None:
        replies, self._replies = self._replies, []
        for reply in replies:
            try:
                reply(outcome)
            except Exception:  # one sender's broken reply must not stop the payment
                log.exception("answering pay %s failed", self.tx_id)


def direct_route(request: PaymentRequest) -> Route:
    """No plug-in routed it: one leg, offered to the receiver."""
    return Route((Leg(request.tx_id, request.sender, request.receiver, request.amount,
                      request.memo),), request.receiver)


class StepTimes:
    """Latency per step, for the router's metrics (common/metrics.py)."""

    def __init__(self) -> None:
        self.offer = Histogram()  # offer sent → the payee's answer
        self.append = Histogram()  # rows sent → the ledger's answer
        self.payment = Histogram()  # request → paid


# Keys per `lookup`: the reply (a signed row is ~330 bytes) must fit the ledger's frame.
LOOKUP_KEYS = 128

# Payments looked up at the ledger before they fail (`Pipeline.begin`) at once, at most:
# beyond it they fail without asking, so refused payments cannot flood the ledger.
MAX_LOOKUPS = 256
# Receipts fetched for payments asked again after they were paid, at once, at most: a
# budget of their own, so a payer re-sending paid tx_ids cannot use up MAX_LOOKUPS (a
# payment from before the start would then fail without the ledger asked).
MAX_RECEIPT_LOOKUPS = 64


class Pipeline:
    """Runs payments against the book, the registry of sessions and the ledger."""

    def __init__(self, book: Book, registry: Registry, ledger: LedgerClient,
                 cfg: RouterConfig, plugins: Plugins | None = None,
                 signatures: PaymentSignatures | None = None,
                 sign_system: Callable[[RowIn], bytes | None] | None = None) -> None:
        self.book = book
        # Signed payments (router/signatures.py): None only on the benchmark's plain run.
        self.signatures = signatures
        # The router's signature of a system payment's debit (a pool's: the mixer's
        # payouts), with its pool-signer key; None: unsigned.
        self.sign_system = sign_system
        self.registry = registry
        self.ledger = ledger
        self.cfg = cfg
        self.plugins = plugins or no_plugins()
        self.plugins_on = self.plugins.enabled
        self._system_accounts = self.plugins.system_accounts
        self.shutting_down = False
        self.inflight: dict[tuple[str, str], Payment] = {}  # by (sender, tx_id)
        self._lookups: set[asyncio.Task[None]] = set()  # `begin` asking the ledger first
        self._receipt_lookups: set[asyncio.Task[None]] = set()  # `_answer_with_receipt`
        self.running_by_sender: dict[str, int] = {}
        self._idle: asyncio.Event | None = None  # set when `inflight` empties (drain)
        # Appends awaiting the ledger, by `outcome_pending` deadline; one timer for all.
        self._appending: deque[tuple[float, Payment]] = deque()
        self._pending_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._unacked = 0  # `settled` frames whose ack has not come (nor failed) yet
        self._all_acked: asyncio.Event | None = None  # made by `drain`
        self.counts: dict[str, int] = {}
        self.times: StepTimes | None = None  # set when metrics are on
        self._do: dict[type, Callable[[Payment, Any], None]] = {
            Hold: self._hold, Release: self._release, SendPing: self._send_ping,
            SendOffer: self._send_offer, AppendRows: self._append,
            StartPendingClock: self._start_pending_clock, Commit: self._commit,
            Settle: self._settle, CancelOffer: self._cancel_offer,
            RecordFailure: self._record_failure, Answer: self._answer,
            ReportPending: self._report_pending, Done: self._done,
        }

    # --- entry points ----------------------------------------------------------------

    def begin(self, sender: str, pay: Pay, reply: Reply) -> Outcome | None:
        """Run (or join, or look up) the payment `pay` from `sender`.

        Returns the outcome when it is known now; otherwise None, and `reply` is called
        once later with the outcome (or `outcome_pending`). A new payment's synchronous
        steps run now; replies and the ledger's answer drive the rest. A payment already
        known is answered from its record, whatever has changed since (a suspension, a
        plug-in's rule): the first outcome stands."""
        tx_id = pay.tx_id
        request = PaymentRequest(sender, tx_id, pay.to, pay.amount, pay.memo, pay.mix)
        try:
            self.validate(request, known=self.book.txs.get(sender, tx_id) is not None)
            route = self._route(request)
        except PaymentKilled as k:
            self._log_failure(request, pay.to, k.code, "validate", k.message)
            return Outcome(tx_id, k.code, k.message)
        main = route.legs[-1]
        signatures = self.signatures
        if signatures is None:
            return self._begin_checked(request, route, reply)
        if signatures.busy:
            return Outcome(tx_id, ErrorCode.RATE_LIMITED, "the router has too many signatures "
                           "to check; retry the same tx_id after a moment")

        def checked(ok: bool) -> None:
            if ok:
                signed = msgspec.structs.replace(main, sender_sig=pay.sig)
                outcome = self._begin_checked(
                    request, Route((*route.legs[:-1], signed), route.payee), reply)
            else:
                how = "not signed" if pay.sig is None else f"not signed by {sender}'s key"
                message = (f"`pay` is {how} over this payment (the row it writes: {sender} → "
                           f"{main.receiver}, {format_amount(main.amount)}, tx_id {tx_id}, "
                           "its memo; docs/PROTOCOL.md §7a)")
                self._log_failure(request, main.receiver, ErrorCode.BAD_SIGNATURE, "validate",
                                  message)
                outcome = Outcome(tx_id, ErrorCode.BAD_SIGNATURE, message)
            if outcome is not None:
                reply(outcome)

        signatures.check_order(main, pay.sig, checked)
        return None

    def _begin_checked(self, request: PaymentRequest, route: Route, reply: Reply
                       ) -> Outcome | None:
        """`begin` once the sender's signature is known good (or not required)."""
        sender, tx_id = request.sender, request.tx_id
        main = route.legs[-1]
        params = TxParams(sender, main.receiver, main.amount, main.memo)
        try:
            record = self.lookup(tx_id, params)
        except PaymentKilled as k:
            self._log_failure(request, main.receiver, k.code, "validate", k.message)
            return Outcome(tx_id, k.code, k.message)
        if record is not None:
            return self._known(record, reply)
        if self.shutting_down:
            self._log_failure(request, main.receiver, ErrorCode.SHUTTING_DOWN, "validate", "")
            return Outcome(tx_id, ErrorCode.SHUTTING_DOWN,
                           "the router is stopping; retry the same tx_id later")
        running = self.running_by_sender.get(sender, 0)
        if running >= self.cfg.payer_max_in_flight:
            return Outcome(tx_id, ErrorCode.RATE_LIMITED,
                           f"{running} payments of yours are in flight (the limit); retry "
                           "the same tx_id when one has ended")
        return self._run(request, route, params, reply)

    async def recall(self, keys: list[tuple[str, str]]) -> list[LedgerRow]:
        """The ledger's rows of these (sender, tx_id) payments; those from before the
        router's start (`Book.base_seq`) are remembered, so they are known from now on.
        Raises LedgerUnavailable."""
        found: list[LedgerRow] = []
        for i in range(0, len(keys), LOOKUP_KEYS):
            found += await self.ledger.lookup(keys[i:i + LOOKUP_KEYS])
        book = self.book
        for row in found:
            if row.seq <= book.base_seq and book.txs.get(row.sender, row.tx_id) is None:
                book.remember(row)
        return found

    def submit(self, request: PaymentRequest) -> None:
        """Run a plug-in's system payment. Its outcome reaches the plug-ins through
        `committed` / `aborted` (also when the tx_id is already known). Raises
        InvariantViolation for a request no plug-in may make."""
        if not (request.system and request.sender in self.plugins.system_accounts
                and request.tx_id.startswith("_") and not is_reserved(request.receiver)):
            raise InvariantViolation(f"system payment {request.tx_id} from {request.sender} "
                                     f"to {request.receiver} is not allowed")
        route = direct_route(request)
        if self.sign_system is not None:
            main = route.legs[-1]
            sig = self.sign_system(main)
            if sig is not None:
                route = Route((msgspec.structs.replace(main, sender_sig=sig),), route.payee)
        params = TxParams(request.sender, request.receiver, request.amount, request.memo)
        if request.receiver in self.registry.suspended:
            self._log_failure(request, request.receiver, ErrorCode.PARTICIPANT_SUSPENDED,
                              "validate", "")
            self._aborted(request, ErrorCode.PARTICIPANT_SUSPENDED)
            return
        try:
            record = self.lookup(request.tx_id, params)
        except PaymentKilled as k:
            self._aborted(request, k.code)
            return
        if record is not None:
            if record.state is TxState.PAID and record.seq is not None:
                self._committed_hook(request, route, [record.seq])
            elif record.state is TxState.FAILED:
                self._aborted(request, ErrorCode(record.code or ErrorCode.INTERNAL_ERROR))
            return  # pending: the run in flight tells the plug-ins
        if self.shutting_down:
            return  # asked again after the restart
        self._run(request, route, params, None)

    def _run(self, request: PaymentRequest, route: Route, params: TxParams,
             reply: Reply | None) -> Outcome | None:
        tx_id = request.tx_id
        if self.plugins_on:
            try:
                self.plugins.admitted(request, route)
            except PluginFailed as exc:
                return self._plugin_failed(request, exc, "admitted")
        sender = request.sender
        if not request.system:
            self.running_by_sender[sender] = self.running_by_sender.get(sender, 0) + 1
        payment = Payment(self.book.txs.begin(tx_id, params), request, route)
        payment.maybe_old = self.book.base_seq > 0
        self.inflight[(sender, tx_id)] = payment
        if reply is not None:
            payment._replies.append(reply)
        self._feed(payment, self._facts(payment))
        return None

    def _facts(self, core: Core) -> Begin:
        accounts = self.book.accounts
        # No payment run here debits `_issuer` (openings are appended at start; plug-in
        # routes may not mint): every debited account pays from what it holds.
        debits = core.debits
        if len(debits) == 1:  # the common case, without a generator
            available: tuple[int, ...] = (accounts.available(debits[0][0]),)
        else:
            available = tuple(accounts.available(account) for account, _ in debits)
        receiver = core.receiver
        registry = self.registry
        known = registry.receiver_exists(receiver) or receiver in self._system_accounts
        link = Link.NONE
        if core.payee is not None:
            session = registry.session(core.payee)
            if session is not None:
                fresh = time.monotonic() - session.channel.last_seen <= self.cfg.freshness_window_s
                link = Link.FRESH if fresh else Link.STALE
        return Begin(available, known, self.ledger.connected, link)

    def _known(self, record: TxRecord, reply: Reply) -> Outcome | None:
        if record.state is TxState.PAID:
            paid = Outcome(record.tx_id, seq=record.seq, dtg=record.dtg)
            if (self.signatures is None or not self.ledger.connected or self.shutting_down
                    or len(self._receipt_lookups) >= MAX_RECEIPT_LOOKUPS):
                return paid  # no receipt to give (or not now): paid stands without one
            task = asyncio.get_running_loop().create_task(
                self._answer_with_receipt(record.params.sender, paid, reply),
                name=f"receipt:{record.tx_id}")
            self._receipt_lookups.add(task)
            task.add_done_callback(self._receipt_lookups.discard)
            return None
        if record.state is TxState.FAILED:
            code = ErrorCode(record.code or ErrorCode.INTERNAL_ERROR)
            return Outcome(record.tx_id, code, f"tx_id {record.tx_id} already failed: {code.doc}")
        payment = self.inflight.get((record.params.sender, record.tx_id))
        if payment is None:  # pending but not running: only while shutting down
            return pending_outcome(record.tx_id)
        payment.add_reply(reply, self.cfg.outcome_pending_after_s)
        return None

    # --- before the run: validate, route, look up ------------------------------------

    def validate(self, request: PaymentRequest, *, known: bool = False) -> None:
        """Raises PaymentKilled: bad_request (to self, reserved tx_id), unknown_receiver
        (a reserved account such as `_issuer`), participant_suspended (the sender or the
        receiver), a plug-in's veto, plugin_failed."""
        if request.receiver == request.sender:
            raise PaymentKilled(ErrorCode.BAD_REQUEST, "a payer cannot pay itself")
        if request.tx_id.startswith("_"):
            raise PaymentKilled(ErrorCode.BAD_REQUEST, "tx_ids starting with `_` are reserved")
        if is_reserved(request.receiver):
            raise PaymentKilled(ErrorCode.UNKNOWN_RECEIVER,
                                f"{request.receiver} is a reserved account")
        if known:  # answered from its record: later rules do not change a first outcome
            return
        suspended = self.registry.suspended
        if suspended and (request.sender in suspended or request.receiver in suspended):
            who = request.sender if request.sender in suspended else request.receiver
            raise PaymentKilled(ErrorCode.PARTICIPANT_SUSPENDED,
                                f"{who} is suspended by the network's operator")
        if self.plugins_on:
            veto = _ask(self.plugins.validate, request)
            if veto is not None:
                raise PaymentKilled(veto.code, veto.message)

    def _route(self, request: PaymentRequest) -> Route:
        """The plug-ins' route, else one direct leg. Raises PaymentKilled."""
        route = _ask(self.plugins.route, request) if self.plugins_on else None
        if route is None:
            if request.mix:
                raise PaymentKilled(ErrorCode.PAYMENT_REFUSED,
                                    "this network has no mixer (the `mixer` plug-in is not "
                                    "enabled); send without --mix")
            return direct_route(request)
        problem = route_problem(request, route, self._system_accounts)
        if problem is not None:
            log_event(log, "plug-in route refused", logging.ERROR, tx_id=request.tx_id,
                      reason=problem)
            raise PaymentKilled(ErrorCode.PLUGIN_FAILED, "a plug-in routed this payment wrongly")
        return route

    def lookup(self, tx_id: str, params: TxParams) -> TxRecord | None:
        """The known record for tx_id, if any. Raises PaymentKilled(tx_id_conflict)."""
        try:
            return self.book.txs.lookup(tx_id, params)
        except TxIdConflict:
            raise PaymentKilled(ErrorCode.TX_ID_CONFLICT,
                                f"tx_id {tx_id} was already used for another payment") from None

    def _plugin_failed(self, request: PaymentRequest, exc: PluginFailed, hook: str) -> Outcome:
        log.error("%s", exc, exc_info=exc.__cause__)
        message = f"plug-in {exc.plugin} failed on this payment"
        self._log_failure(request, request.receiver, ErrorCode.PLUGIN_FAILED, hook, message)
        return Outcome(request.tx_id, ErrorCode.PLUGIN_FAILED, message)

    # --- the run: events in, actions out ------------------------------------------------

    def _feed(self, p: Payment, event: Event) -> None:
        """`payment_core.handle` (its table looked up here, one call less on the hot
        path), then carry the actions out in order."""
        handler = TABLE.get((p.phase, event.__class__))
        try:
            if handler is None:
                actions = handle(p, event, time.monotonic())  # ignores, or raises
            else:
                actions = handler(p, event, time.monotonic())
        except IllegalTransition:
            log.exception("payment %s: event ignored", p.tx_id)
            return
        do = self._do
        i = 0
        try:
            for action in actions:
                do[action.__class__](p, action)
                i += 1
        except Exception as exc:
            log.exception("payment %s failed at step %s (%s)", p.tx_id, p.step,
                          type(actions[i]).__name__)
            if p.phase in (Phase.PAID, Phase.FAILED, Phase.ABANDONED):
                # Past the decision: what is left (answer, settled, done) still runs.
                self._carry_out(p, actions[i + 1:])
            else:
                self._feed(p, Crashed(type(exc).__name__))

    def _carry_out(self, p: Payment, actions: list[Action]) -> None:
        """What is left of a decided payment's actions after one raised: each is tried."""
        for action in actions:
            try:
                self._do[action.__class__](p, action)
            except Exception:
                log.exception("payment %s: %s failed", p.tx_id, type(action).__name__)

    def _hold(self, p: Payment, a: Hold) -> None:
        accounts = self.book.accounts
        for account, amount in a.debits:
            accounts.place_hold(account, amount)

    def _release(self, p: Payment, a: Release) -> None:
        accounts = self.book.accounts
        for account, amount in a.debits:
            accounts.release_hold(account, amount)

    def _send_ping(self, p: Payment, a: SendPing) -> None:
        session = self.registry.session(a.payee)

        def ponged(reply: Message | BaseException) -> None:
            if isinstance(reply, BaseException) and not isinstance(
                    reply, TimeoutError | ConnectionLost | RequestFailed):
                self._feed(p, Crashed(type(reply).__name__))
                return
            self._feed(p, PingAnswered(isinstance(reply, Pong)))

        if session is not None:
            with contextlib.suppress(ConnectionLost):
                session.channel.request_nowait(Ping(id=0), self.cfg.ping_timeout_s, ponged)
                return
        self._feed(p, PingAnswered(False))

    def _send_offer(self, p: Payment, a: SendOffer) -> None:
        session = self.registry.session(a.payee)
        if session is None or session.channel.closed:
            self._feed(p, OfferAnswered(OfferAnswer.GONE))
            return
        ch = session.channel
        rid = ch.next_id()
        ch.send_nowait(Offer(id=rid, tx_id=p.tx_id, sender=p.sender, amount=p.amount,
                             memo=p.legs[-1].memo))
        if self.times is not None:
            p.mark = time.monotonic()
        ch.expect_reply(rid, self.cfg.offer_timeout_s, lambda reply: self._offer_answered(p, reply))

    def _offer_answered(self, p: Payment, reply: Message | BaseException) -> None:
        event = self._offer_answer(p, reply)
        signatures = self.signatures
        if event.__class__ is not OfferAnswered:
            self._feed(p, event)
            return
        assert isinstance(event, OfferAnswered)
        if signatures is None:  # the benchmark's unsigned run: no signature is kept
            self._feed(p, OfferAnswered(OfferAnswer.RECEIPT)
                       if event.answer is OfferAnswer.RECEIPT else event)
            return
        if event.answer is not OfferAnswer.RECEIPT:
            self._feed(p, event)
            return
        sig = event.sig

        def checked(ok: bool) -> None:  # the payment may have ended meanwhile: then ignored
            if ok:
                self._feed(p, event)
                return
            how = "not signed" if sig is None else "not signed by its key"
            self._feed(p, OfferAnswered(OfferAnswer.BAD_SIGNATURE,
                                        f"{p.payee}'s receipt is {how} over this payment"))

        signatures.check_acceptance(p.legs[-1], sig, checked)

    def _offer_answer(self, p: Payment, reply: Message | BaseException) -> Event:
        if self.times is not None:
            self.times.offer.observe(time.monotonic() - p.mark)
        if type(reply) is Receipt and reply.tx_id == p.tx_id:  # the common case first
            return OfferAnswered(OfferAnswer.RECEIPT, sig=reply.sig)
        payee = p.payee
        if isinstance(reply, TimeoutError):
            return OfferAnswered(OfferAnswer.TIMEOUT, f"{payee} did not answer the offer in "
                                                      f"{self.cfg.offer_timeout_s}s")
        if isinstance(reply, ConnectionLost):
            return OfferAnswered(OfferAnswer.LOST)
        if isinstance(reply, RequestFailed):
            return OfferAnswered(OfferAnswer.REJECTED, f"{payee} answered the offer with {reply}")
        if isinstance(reply, BaseException):
            return Crashed(type(reply).__name__)
        if isinstance(reply, Reject):
            return OfferAnswered(OfferAnswer.REJECTED,
                                 reply.reason or f"{payee} rejected the payment")
        return OfferAnswered(OfferAnswer.WRONG)

    def _append(self, p: Payment, a: AppendRows) -> None:
        """The commit point: the rows go to the ledger; its answer is fed back. The
        future is never cancelled by the `outcome_pending` wait."""
        rows = a.rows
        if self.times is not None:
            self._append_timed(p, rows)
            return
        if len(rows) == 1:  # a plain callback: the answer is fed in the turn it arrives
            self.ledger.append_cb(rows[0], lambda res: self._feed(p, _appended(res)))
        else:
            futs = self.ledger.append_atomic(list(rows))
            gathered = asyncio.gather(*futs, return_exceptions=True)
            gathered.add_done_callback(lambda _: self._feed(p, _ledger_answer(futs)))

    def _append_timed(self, p: Payment, rows: tuple[RowIn, ...]) -> None:
        """`_append` with the append leg's latency observed (metrics on)."""
        times = self.times
        assert times is not None
        p.mark = time.monotonic()

        def answered(result: AppendResult | BaseException) -> None:
            times.append.observe(time.monotonic() - p.mark)
            self._feed(p, _appended(result))

        if len(rows) == 1:
            self.ledger.append_cb(rows[0], answered)
            return
        futs = self.ledger.append_atomic(list(rows))

        def all_answered(_: object) -> None:
            times.append.observe(time.monotonic() - p.mark)
            self._feed(p, _ledger_answer(futs))

        asyncio.gather(*futs, return_exceptions=True).add_done_callback(all_answered)

    def _start_pending_clock(self, p: Payment, a: StartPendingClock) -> None:
        queue = self._appending
        while queue and queue[0][1].phase is not Phase.APPENDING:
            # Answered: let go of the head now, or every payment of the last
            # `outcome_pending_after_s` stays alive (and the collector walks them all).
            queue.popleft()
        queue.append((time.monotonic() + self.cfg.outcome_pending_after_s, p))
        if self._pending_timer is None:
            self._pending_timer = asyncio.get_running_loop().call_later(
                self.cfg.outcome_pending_after_s, self._check_pending)

    def _check_pending(self) -> None:
        """Feed `PendingDue` to every append unanswered for `outcome_pending_after_s`.
        The deadlines are queued in order (one delay), one timer for all."""
        self._pending_timer = None
        queue = self._appending
        now = time.monotonic()
        while queue and (queue[0][0] <= now or queue[0][1].phase is not Phase.APPENDING):
            _, p = queue.popleft()  # due, or answered already
            if p.phase is Phase.APPENDING:
                self._feed(p, PendingDue())
        if queue:
            self._pending_timer = asyncio.get_running_loop().call_later(
                max(0.0, queue[0][0] - now), self._check_pending)

    def _commit(self, p: Payment, a: Commit) -> None:
        """Move the money of every leg (releasing its hold); the main leg marks the
        payment paid."""
        book = self.book
        legs = p.legs
        results = a.results
        for i in range(len(legs) - 1):  # extra legs first, as written
            leg = legs[i]
            seq, dtg = results[i]
            book.commit_leg(leg.tx_id, leg.sender, leg.receiver, leg.amount, leg.memo, seq, dtg)
        main = legs[-1]
        seq, dtg = results[-1]
        book.commit(main.tx_id, main.sender, main.receiver, main.amount, seq, dtg)
        counts = self.counts
        counts["paid"] = counts.get("paid", 0) + 1
        if self.times is not None:
            self.times.payment.observe(time.monotonic() - p.started)
        log_event(log, "payment", tx_id=p.tx_id, sender=p.sender, receiver=p.receiver,
                  amount=format_amount(p.amount), outcome="paid", seq=seq,
                  legs=len(legs) if len(legs) > 1 else None,
                  ms=round((time.monotonic() - p.started) * 1000, 1))
        if self.plugins_on:
            self._committed_hook(p.request, p.route, [s for s, _ in results])

    def _committed_hook(self, request: PaymentRequest, route: Route, seqs: list[int]) -> None:
        try:
            self.plugins.committed(request, route, seqs)
        except PluginFailed as exc:  # the money moved: log, go on
            log.error("%s", exc, exc_info=exc.__cause__)

    def _aborted(self, request: PaymentRequest, code: ErrorCode) -> None:
        if not self.plugins_on:
            return
        try:
            self.plugins.aborted(request, code)
        except PluginFailed as exc:
            log.error("%s", exc, exc_info=exc.__cause__)

    def _settle(self, p: Payment, a: Settle) -> None:
        """`settled` to the payee; its ack is waited for by the channel (a callback and a
        shared deadline, no future or task). A failure changes nothing: the payment is
        in the ledger; the payee resyncs later. `drain` waits for the acks outstanding."""
        payee = a.payee
        session = self.registry.session(payee)
        tx_id = p.tx_id
        if session is None or session.channel.closed:
            log_event(log, "receiver gone before settled", tx_id=tx_id, receiver=payee)
            return
        ch = session.channel

        def acked(reply: Message | BaseException) -> None:
            self._unacked -= 1
            if self._unacked == 0 and self._all_acked is not None:
                self._all_acked.set()
            if isinstance(reply, BaseException):
                log_event(log, "receiver did not ack settled", logging.WARNING, tx_id=tx_id,
                          receiver=payee, error=str(reply) or type(reply).__name__)

        rid = ch.next_id()
        ch.send_nowait(Settled(id=rid, tx_id=tx_id, sender=p.sender, seq=a.seq, proof=a.proof,
                               balance=self.book.accounts.balance(payee), amount=p.amount,
                               memo=p.legs[-1].memo))
        self._unacked += 1
        ch.expect_reply(rid, self.cfg.settle_timeout_s, acked)

    def _cancel_offer(self, p: Payment, a: CancelOffer) -> None:
        session = self.registry.session(a.payee)
        if session is None:
            return
        channel = session.channel
        tx_id, sender, payee, amount = p.tx_id, p.sender, a.payee, p.amount

        async def send() -> None:
            try:
                await channel.request(Cancel(id=0, tx_id=tx_id, sender=sender,
                                             code=a.code.value, amount=amount),
                                      timeout=self.cfg.settle_timeout_s)
            except (TimeoutError, ConnectionLost, RequestFailed) as exc:
                log_event(log, "receiver did not ack cancel", tx_id=tx_id,
                          receiver=payee, error=str(exc) or type(exc).__name__)

        task = asyncio.get_running_loop().create_task(send(), name=f"cancel:{tx_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record_failure(self, p: Payment, a: RecordFailure) -> None:
        if (p.maybe_old and a.code is not ErrorCode.TX_ID_CONFLICT
                and len(self._lookups) < MAX_LOOKUPS):
            # Perhaps a retry of a payment from before the start: ask the ledger before
            # this failure is recorded or answered (its Answer waits in `deferred`).
            p.maybe_old = False
            p.deferred = [a]
            task = asyncio.get_running_loop().create_task(self._settle_maybe_old(p),
                                                          name=f"recall:{p.tx_id}")
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)
            return
        try:
            self.book.txs.mark_failed(p.sender, p.tx_id, a.code.value)
            self._log_failure(p.request, p.receiver, a.code, a.step, a.message)
        finally:
            self._aborted(p.request, a.code)

    def _answer(self, p: Payment, a: Answer) -> None:
        if p.deferred is not None:
            p.deferred.append(a)
            return
        p.answer(a.outcome)

    async def _answer_with_receipt(self, sender: str, paid: Outcome, reply: Reply) -> None:
        """A `pay` of a payment already paid (its first `paid` lost): the answer carries
        the ledger's receipt of its row, as the first did. If the ledger cannot give one
        now, `paid` goes without it (the same `pay` asks again)."""
        proof = None
        try:
            found = await self.ledger.find([(sender, paid.tx_id)])
            row = found.rows[0] if found.rows else None
            if row is not None and row.seq == paid.seq and found.seal is not None:
                proof = ledger_proof(row.seq, row.hash, found.seal)
        except LedgerUnavailable as exc:
            log_event(log, "no receipt for a paid payment asked again", tx_id=paid.tx_id,
                      sender=sender, error=str(exc))
        finally:  # also when cancelled (the router stopping): paid is the answer
            reply(msgspec.structs.replace(paid, proof=proof))

    async def _settle_maybe_old(self, p: Payment) -> None:
        """A payment the router did not know failed before its row was written: if the
        ledger has that (sender, tx_id) from before the start, it was paid then (answer
        it so) or it is another payment (tx_id_conflict); if not, the failure stands; if
        the ledger cannot tell, nothing is recorded and the sender may retry the tx_id."""
        deferred, p.deferred = p.deferred or [], None
        failure = next(a for a in deferred if isinstance(a, RecordFailure))
        answers = [a for a in deferred if isinstance(a, Answer)]
        try:
            found = await self.ledger.find([(p.sender, p.tx_id)])
        except LedgerUnavailable as exc:
            self.book.txs.forget_pending(p.sender, p.tx_id)
            self._log_failure(p.request, p.receiver, ErrorCode.LEDGER_UNAVAILABLE,
                              failure.step, f"{failure.code.value}, unconfirmed: {exc}")
            self._aborted(p.request, ErrorCode.LEDGER_UNAVAILABLE)
            p.answer(Outcome(p.tx_id, ErrorCode.LEDGER_UNAVAILABLE,
                             f"{failure.message}; the ledger could not confirm that this "
                             "tx_id is new: retry the same tx_id"))
            return
        row = found.rows[0] if found.rows else None
        if row is None:
            self._record_failure(p, failure)
            for a in answers:
                p.answer(a.outcome)
            return
        book = self.book
        if TxParams(row.sender, row.receiver, row.amount, row.memo) == p.params:
            book.txs.record_row(row)  # pending -> paid, as the ledger says
            book.accounts.touch(row.sender, row.dtg)
            book.accounts.touch(row.receiver, row.dtg)
            log_event(log, "payment", tx_id=p.tx_id, sender=p.sender, receiver=row.receiver,
                      amount=format_amount(row.amount), outcome="paid", seq=row.seq,
                      found="ledger")
            proof = None if found.seal is None else ledger_proof(row.seq, row.hash, found.seal)
            p.answer(Outcome(p.tx_id, seq=row.seq, dtg=row.dtg, proof=proof))
            return
        self._record_failure(p, RecordFailure(ErrorCode.TX_ID_CONFLICT, failure.step,
                                              "tx_id used before for another payment"))
        p.answer(Outcome(p.tx_id, ErrorCode.TX_ID_CONFLICT,
                         f"tx_id {p.tx_id} was already used for another payment"))

    def _report_pending(self, p: Payment, a: ReportPending) -> None:
        if p.phase is Phase.ABANDONED:
            log_event(log, "payment abandoned", logging.WARNING, tx_id=p.tx_id, step=p.step)
        else:
            log_event(log, "payment outcome pending", logging.WARNING, tx_id=p.tx_id,
                      sender=p.sender, receiver=p.receiver, amount=format_amount(p.amount),
                      step=p.step)
        p.answer(pending_outcome(p.tx_id))

    def _done(self, p: Payment, a: Done) -> None:
        inflight = self.inflight
        key = (p.sender, p.tx_id)
        if inflight.pop(key, None) is not None and not p.request.system:
            running = self.running_by_sender
            n = running[p.sender] - 1
            if n:
                running[p.sender] = n
            else:
                del running[p.sender]
        if not inflight and self._idle is not None:
            self._idle.set()

    # --- plug-in timer ---------------------------------------------------------------

    def tick(self) -> None:
        """Ask the plug-ins for system payments, and run them."""
        if not self.plugins_on or self.shutting_down:
            return
        try:
            requests = self.plugins.tick(time.time())
        except PluginFailed as exc:
            log.error("%s", exc, exc_info=exc.__cause__)
            return
        for request in requests:
            try:
                self.submit(request)
            except InvariantViolation:
                log.exception("plug-in system payment refused")

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
            self._feed(p, Abandon())
        for p in list(self.inflight.values()):  # committed, still finishing: let go
            self._done(p, Done())
        background = self._background | self._receipt_lookups
        if background:
            await asyncio.wait(background, timeout=min(grace_s, self.cfg.settle_timeout_s))
        if self._unacked:  # settled frames still waiting for their ack
            self._all_acked = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_acked.wait(),
                                       timeout=min(grace_s, self.cfg.settle_timeout_s))
        return len(left)

    def _log_failure(self, request: PaymentRequest, receiver: str, code: ErrorCode, step: str,
                     message: str) -> None:
        """The decision line of a payment that failed (`_commit` logs the paid ones).
        `receiver` is what the ledger row would name (the pool for a mixed payment)."""
        key = code.value
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        log_event(log, "payment", tx_id=request.tx_id, sender=request.sender,
                  receiver=receiver if not request.mix or receiver.startswith("_") else "(mixed)",
                  amount=format_amount(request.amount), outcome="failed", code=key, step=step,
                  reason=message or None)


T = TypeVar("T")


def _ask(hook: Callable[[PaymentRequest], T], request: PaymentRequest) -> T:
    """A plug-in hook's answer about `request`. Raises PaymentKilled(plugin_failed), the
    plug-in named, if it raised (its traceback goes to the router's log)."""
    try:
        return hook(request)
    except PluginFailed as exc:
        log.error("%s", exc, exc_info=exc.__cause__)
        raise PaymentKilled(ErrorCode.PLUGIN_FAILED,
                            f"plug-in {exc.plugin} failed on this payment") from None


def ledger_proof(seq: int, row_hash: str, seal: Seal) -> LedgerProof | None:
    """A payer's receipt of row `seq` (hash `row_hash`): the ledger's signed head, when it
    is at or after that row (else it does not cover it: None)."""
    if seal.head_seq < seq:
        return None
    return LedgerProof(seq=seq, hash=row_hash, head_seq=seal.head_seq,
                       head_hash=seal.head_hash, sig=seal.sig)


def _appended(result: AppendResult | BaseException) -> Event:
    """The ledger's answer to a one-leg append, as a core event."""
    if type(result) is AppendResult:
        if result.status != "conflict":  # written, or a duplicate: durable
            seal = result.seal
            proof = None if seal is None else ledger_proof(result.seq, result.hash, seal)
            return LedgerAnswered(LedgerAnswer.WRITTEN, ((result.seq, result.dtg),),
                                  proof=proof)
        return LedgerAnswered(LedgerAnswer.CONFLICT)
    if isinstance(result, asyncio.CancelledError):
        return LedgerAnswered(LedgerAnswer.CANCELLED)
    if isinstance(result, LedgerUnavailable):
        return LedgerAnswered(LedgerAnswer.UNAVAILABLE, detail=str(result))
    if isinstance(result, LedgerRefused):
        return LedgerAnswered(LedgerAnswer.REFUSED, code=refusal_code(result),
                              detail=str(result))
    return Crashed(type(result).__name__)


def _ledger_answer(futs: tuple[asyncio.Future[AppendResult], ...] | list[asyncio.Future[AppendResult]]
                   ) -> Event:
    """The ledger's answer to a payment's append (one future per leg), as a core event:
    the first leg that did not get written decides; else every leg's (seq, dtg)."""
    results: list[tuple[int, str]] = []
    proof = None
    for fut in futs:
        answer: AppendResult | BaseException
        if fut.cancelled():  # the ledger client was closed under it: the outcome is unknown
            answer = asyncio.CancelledError()
        else:
            answer = fut.exception() or fut.result()
        event = _appended(answer)
        if not (isinstance(event, LedgerAnswered) and event.answer is LedgerAnswer.WRITTEN):
            return event
        results.extend(event.results)
        proof = event.proof  # the main leg's, which comes last
    return LedgerAnswered(LedgerAnswer.WRITTEN, tuple(results), proof=proof)
