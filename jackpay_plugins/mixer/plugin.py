"""The mixer plug-in: hooks that turn `send --mix` into a deposit to `_mixer` and rounds of
payouts (pool.py has the rules, journal.py the durable state). Enabled by
`[router] plugins = ["mixer"]`; settings in `[plugins.mixer]`, each with a default.

Privacy rules kept here: nothing this plug-in logs, returns to `inspect` or writes to the
ledger puts a payer next to its payee (payout rows carry no memo, deposits drop theirs);
only the journal (0600, beside the router) and the payer's own `status` link them.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from common.errors import ConfigError, ErrorCode
from common.money import AmountError, format_amount, parse_amount
from jackpay_plugins.mixer.journal import Journal
from jackpay_plugins.mixer.pool import (
    POOL,
    Mixer,
    Note,
    Round,
    Settings,
    parse_note_tx_id,
)
from router.payment_core import Leg
from router.plugins import (
    PaymentRequest,
    PluginContext,
    Route,
    StartInfo,
    StatusNote,
    Veto,
    hookimpl,
)

log = logging.getLogger("jackpay.plugins.mixer")

JOURNAL_FILE = "journal.jsonl"

Positive = Annotated[float, msgspec.Meta(gt=0, le=86_400)]


class MixerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[plugins.mixer]`; the defaults let a demo finish within a minute."""

    min_payers: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 5
    min_delay_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 1.0
    max_delay_s: Positive = 5.0
    max_wait_s: Positive = 40.0
    on_timeout: Literal["refund", "payout"] = "refund"
    denominations: list[str] = msgspec.field(default_factory=lambda: [
        "0.01", "0.02", "0.05", "0.10", "0.20", "0.50", "1.00", "2.00", "5.00", "10.00",
        "20.00", "50.00", "100.00", "200.00", "500.00", "1000.00", "2000.00", "5000.00"])
    max_waiting_per_payer: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    retry_s: Positive = 1.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 30

    def settings(self) -> Settings:
        if self.max_delay_s < self.min_delay_s:
            raise ConfigError("max_delay_s must be at least min_delay_s")
        try:
            denoms = tuple(sorted({parse_amount(d) for d in self.denominations}))
        except AmountError as exc:
            raise ConfigError(f"denominations: {exc}") from None
        if not denoms or denoms[0] != 1:
            raise ConfigError('denominations must include "0.01" (one minor unit), so that '
                              "every amount can be paid out")
        return Settings(self.min_payers, self.min_delay_s, self.max_delay_s, self.max_wait_s,
                        self.on_timeout, denoms, self.max_waiting_per_payer, self.retry_s,
                        self.max_attempts)


def _epoch(dtg: str) -> float:
    return datetime.strptime(dtg, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class MixerPlugin:
    def __init__(self, settings: Settings, context: PluginContext) -> None:
        self.context = context
        self.mixer = Mixer(settings)
        self.journal = Journal(context.state_dir / JOURNAL_FILE)

    # --- start -------------------------------------------------------------------------

    @hookimpl
    def jackpay_system_accounts(self) -> list[str]:
        return [POOL]

    @hookimpl
    def jackpay_start(self, info: StartInfo) -> None:
        """Rebuild from the journal and the ledger rows of `_mixer`."""
        entries = self.journal.read()
        mixer = self.mixer
        for e in entries:
            if e["e"] == "intent":
                mixer.intents[(e["payer"], e["tx"])] = (e["payee"], e["amount"])
        payouts = []
        for row in info.rows:
            if row.receiver == POOL and not row.sender.startswith("_"):
                mixer.deposited(row.sender, row.tx_id, row.amount, row.seq, _epoch(row.dtg))
            elif row.sender == POOL:
                payouts.append(row)
        for e in entries:
            if e["e"] == "round":
                mixer.apply_round(_round_from_entry(e))
            elif e["e"] == "attempt":
                mixer.set_attempt(e["round"], e["note"], e["attempt"], e["refund"], info.now)
        for row in payouts:
            parsed = parse_note_tx_id(row.tx_id)
            if parsed is not None:
                mixer.note_paid(parsed[0], parsed[1], row.seq)
        self.journal.open()
        owed = mixer.pool_owed()
        if owed != info.balances.balance(POOL):
            log.error("mixer: the pool holds %s but its deposits and payouts say %s",
                      format_amount(info.balances.balance(POOL)), format_amount(owed))
        log.info("mixer started: %s", mixer.statistics())

    # --- a participant's mixed payment ------------------------------------------------

    @hookimpl
    def jackpay_validate(self, request: PaymentRequest) -> Veto | None:
        if not request.mix:
            return None
        if not self.context.is_participant(request.receiver):
            return Veto(f"{request.receiver} is not a participant of this network",
                        ErrorCode.UNKNOWN_RECEIVER)
        limit = self.mixer.settings.max_waiting_per_payer
        if self.mixer.waiting_of(request.sender) >= limit:
            return Veto(f"you have {limit} deposits waiting in the mixer (the limit); wait "
                        "for a round to close", ErrorCode.RATE_LIMITED)
        return None

    @hookimpl
    def jackpay_route(self, request: PaymentRequest) -> Route | None:
        if not request.mix:
            return None
        # The memo stays out of the ledger: it could name the payee.
        return Route((Leg(request.tx_id, request.sender, POOL, request.amount),), None)

    @hookimpl
    def jackpay_admitted(self, request: PaymentRequest, route: Route) -> None:
        if not request.mix:
            return
        key = (request.sender, request.tx_id)
        # Made durable by `jackpay_flush`, before the deposit's row leaves for the ledger.
        self.journal.write({"e": "intent", "payer": request.sender, "tx": request.tx_id,
                            "payee": request.receiver, "amount": request.amount}, sync=False)
        self.mixer.intents[key] = (request.receiver, request.amount)

    @hookimpl
    def jackpay_flush(self) -> None:
        self.journal.sync()

    @hookimpl
    def jackpay_committed(self, request: PaymentRequest, route: Route, seqs: list[int]) -> None:
        if request.mix:
            self.mixer.deposited(request.sender, request.tx_id, request.amount, seqs[-1],
                                 time.time())
        elif request.system and request.sender == POOL:
            parsed = parse_note_tx_id(request.tx_id)
            if parsed is not None:
                self.mixer.note_paid(parsed[0], parsed[1], seqs[-1])

    @hookimpl
    def jackpay_aborted(self, request: PaymentRequest, code: ErrorCode) -> None:
        if request.mix:
            self.mixer.intents.pop((request.sender, request.tx_id), None)
            return
        if not (request.system and request.sender == POOL):
            return
        parsed = parse_note_tx_id(request.tx_id)
        if parsed is None:
            return
        round_id, index, attempt = parsed
        note = self.mixer.note(round_id, index)
        if note is None or note.paid_seq is not None or note.attempt != attempt:
            return
        nxt, refund = self.mixer.next_attempt(note)
        try:
            self.journal.write({"e": "attempt", "round": round_id, "note": index,
                                "attempt": nxt, "refund": refund})
        except OSError:
            # The next attempt must not go out unjournalled (after a restart the journal
            # would send this one again while the next could still land: one note paid
            # twice). This attempt is tried again later instead: the router answers it
            # from its record (failed) and this hook runs again, writing the journal then.
            self.mixer.retry_later(note, time.time())
            raise
        self.mixer.set_attempt(round_id, index, nxt, refund, time.time())
        log.info("mixer: payout note failed (%s); attempt %d%s", code.value, nxt,
                 " as a refund" if refund and not note.refund else "")

    # --- rounds ------------------------------------------------------------------------

    @hookimpl
    def jackpay_tick(self, now: float) -> list[PaymentRequest]:
        mixer = self.mixer
        for amount, chosen, low in mixer.rounds_due(now):
            rnd = mixer.plan_round(amount, chosen, low, now)
            self.journal.write(_round_entry(rnd))
            mixer.apply_round(rnd)
            log.info("mixer: round %d closed: %d payers, %s each, %d notes%s", rnd.id,
                     len(rnd.deposits), format_amount(amount), len(rnd.notes),
                     "; low-anonymity: " + ("refunded" if rnd.notes and rnd.notes[0].refund
                                            else "paid out") if low else "")
        out = []
        for rnd, note in mixer.notes_to_send(now):
            note.running = True
            out.append(PaymentRequest(POOL, note.tx_id(rnd.id), note.payee, note.amount,
                                      system=True))
        return out

    @hookimpl
    def jackpay_status(self, sender: str, tx_id: str) -> StatusNote | None:
        described = self.mixer.describe(sender, tx_id)
        if described is None:
            return None
        return StatusNote(*described)

    @hookimpl
    def jackpay_statistics(self) -> dict[str, Any]:
        return dict(self.mixer.statistics())


def _round_entry(rnd: Round) -> dict[str, Any]:
    return {"e": "round", "id": rnd.id, "amount": rnd.amount, "at": rnd.closed_at,
            "low": rnd.low_anonymity, "deposits": [list(k) for k in rnd.deposits],
            "notes": [[n.payee, n.amount, n.deposit[0], n.deposit[1], n.refund]
                      for n in rnd.notes]}


def _round_from_entry(e: dict[str, Any]) -> Round:
    notes = [Note(i, payee, amount, (payer, tx), refund)
             for i, (payee, amount, payer, tx, refund) in enumerate(e["notes"])]
    return Round(e["id"], e["amount"], [(p, t) for p, t in e["deposits"]], notes, e["low"],
                 e["at"])


def make_plugin(settings: dict[str, Any], context: PluginContext) -> MixerPlugin:
    """The entry point (`jackpay.plugins`: mixer). Raises ConfigError for bad settings."""
    try:
        parsed = msgspec.convert(settings, MixerSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    return MixerPlugin(parsed.settings(), context)
