"""The invariant checker: judge a whole run from the ledger file and the recorded history.

Pure: give it the ledger's bytes, what every client was told, and (optionally) the
router's own view at the end; it returns every violation of DESIGN §1 it can prove, each
with the offending rows or operations. Modelled on Jepsen's bank checker.

Outcomes a client can record for one attempt of a payment (`Attempt.kind`):
- "ok"            the router said `paid` (with `seq`);
- "failed"        a definite failure code (insufficient_funds, receiver_rejected, …);
- "indeterminate" no answer, a lost connection, or a retriable in-doubt code
                  (outcome_pending, ledger_unavailable after a send, …).
Codes in DEFINITE_FAILURES promise that the payment did not happen; a ledger row for such
a payment is a violation.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from common.messages import ISSUER, LedgerRow
from common.money import format_amount
from jackpay_plugins.mixer.pool import POOL as MIXER_POOL
from jackpay_plugins.mixer.pool import parse_note_tx_id
from ledger.store import LedgerCorrupt, load_rows

# Failure codes after which the payment must not be in the ledger.
DEFINITE_FAILURES = frozenset({
    "bad_request", "tx_id_conflict", "insufficient_funds", "unknown_receiver",
    "receiver_unreachable", "receiver_timeout", "receiver_rejected", "ledger_write_failed",
    "ledger_unavailable", "shutting_down",
})

Kind = Literal["ok", "failed", "indeterminate"]


@dataclass(frozen=True, slots=True)
class Attempt:
    kind: Kind
    code: str | None = None
    seq: int | None = None


@dataclass(slots=True)
class Operation:
    """One payment the workload tried, with every answer it got for its tx_id."""

    tx_id: str
    sender: str
    receiver: str
    amount: int
    memo: str = ""
    mix: bool = False  # through the mixer: its row is sender -> _mixer
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> Attempt | None:
        decided = [a for a in self.attempts if a.kind != "indeterminate"]
        return decided[-1] if decided else None


@dataclass(frozen=True, slots=True)
class RouterView:
    """What the router's admin query reports at the end of a run."""

    balances: dict[str, int]
    holds: dict[str, int]
    in_flight: list[str]


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(slots=True)
class Report:
    violations: list[Violation]
    rows: int
    balances: dict[str, int]
    counts: Counter[str]

    @property
    def ok(self) -> bool:
        return not self.violations


def _fmt_row(r: LedgerRow) -> str:
    return f"seq {r.seq} {r.tx_id} {r.sender}->{r.receiver} {format_amount(r.amount)}"


def replay(rows: list[LedgerRow]) -> tuple[dict[str, int], list[Violation]]:
    """Balances after every row, and any moment a non-issuer balance went negative."""
    bal: dict[str, int] = defaultdict(int)
    out: list[Violation] = []
    for r in rows:
        bal[r.sender] -= r.amount
        bal[r.receiver] += r.amount
        if r.sender != ISSUER and bal[r.sender] < 0:
            out.append(Violation("negative_balance",
                                 f"{r.sender} at {format_amount(bal[r.sender])} after {_fmt_row(r)}"))
    return dict(bal), out


def check(
    ledger_bytes: bytes,
    history: list[Operation],
    router: RouterView | None = None,
    *,
    require_success_after_heal: bool = False,
    succeeded_after_heal: bool = True,
) -> Report:
    violations: list[Violation] = []
    try:
        rows, good = load_rows(ledger_bytes, "ledger")
        if good < len(ledger_bytes):
            violations.append(Violation("verify", "the ledger ends in a torn line"))
    except LedgerCorrupt as exc:
        return Report([Violation("verify", str(exc))], 0, {}, Counter())

    balances, negative = replay(rows)
    violations += negative
    if sum(balances.values()) != 0:
        violations.append(Violation("money_not_conserved",
                                    f"ledger balances sum to {sum(balances.values())}"))

    # A payment is named by (sender, tx_id): two payers may use the same tx_id.
    by_tx: dict[tuple[str, str], list[LedgerRow]] = defaultdict(list)
    for r in rows:
        by_tx[(r.sender, r.tx_id)].append(r)
    for (sender, tx), rs in by_tx.items():
        if len(rs) > 1:
            violations.append(Violation("duplicate_row",
                                        f"{tx} of {sender} recorded {len(rs)} times: "
                                        + "; ".join(_fmt_row(r) for r in rs)))

    counts: Counter[str] = Counter()
    for op in history:
        recorded = by_tx.get((op.sender, op.tx_id), [])
        oks = [a for a in op.attempts if a.kind == "ok"]
        fails = [a for a in op.attempts if a.kind == "failed"]
        final = op.final
        counts[(final.code or "ok") if final else "undecided"] += 1
        if oks and fails:
            violations.append(Violation(
                "decided_twice", f"{op.tx_id} was told paid and also failed "
                f"({', '.join(str(a.code) for a in fails)})"))
        if len({a.seq for a in oks}) > 1:
            violations.append(Violation("decided_twice",
                                        f"{op.tx_id} was told paid with seqs {sorted({a.seq or 0 for a in oks})}"))
        if oks and not recorded:
            violations.append(Violation("acked_missing",
                                        f"{op.tx_id} ({op.sender}->{op.receiver} "
                                        f"{format_amount(op.amount)}) was told paid (seq "
                                        f"{oks[0].seq}) but is not in the ledger"))
        for r in recorded:
            if oks and oks[0].seq is not None and r.seq != oks[0].seq:
                violations.append(Violation("acked_wrong_seq",
                                            f"{op.tx_id} told seq {oks[0].seq}; ledger {_fmt_row(r)}"))
            receiver = MIXER_POOL if op.mix else op.receiver
            if (r.sender, r.receiver, r.amount) != (op.sender, receiver, op.amount):
                violations.append(Violation("row_differs",
                                            f"{op.tx_id} asked {op.sender}->{op.receiver} "
                                            f"{format_amount(op.amount)}; ledger {_fmt_row(r)}"))
            definite = [a for a in fails if a.code in DEFINITE_FAILURES]
            if definite:
                violations.append(Violation("row_for_failed_payment",
                                            f"{_fmt_row(r)} but the sender was told "
                                            f"{definite[0].code}"))

    if router is not None:
        for acct in sorted(set(balances) | set(router.balances)):
            want, got = balances.get(acct, 0), router.balances.get(acct, 0)
            if want != got:
                violations.append(Violation("router_differs_from_ledger",
                                            f"{acct}: router {format_amount(got)}, "
                                            f"ledger replay {format_amount(want)}"))
        if sum(router.balances.values()) != 0:
            violations.append(Violation("money_not_conserved",
                                        f"router balances sum to {sum(router.balances.values())}"))
        for acct, held in sorted(router.holds.items()):
            if held:
                violations.append(Violation("hold_left", f"{acct} still has {format_amount(held)} held"))
        for tx in router.in_flight:
            violations.append(Violation("hold_left", f"payment {tx} still in flight after quiescence"))

    if require_success_after_heal and not succeeded_after_heal:
        violations.append(Violation("no_progress_after_heal",
                                    "no payment succeeded after the faults were healed"))
    return Report(violations, len(rows), balances, counts)


def check_mixer(ledger_bytes: bytes, journal: list[dict[str, Any]]) -> list[Violation]:
    """The mixer's promises, from the ledger and its journal once the network is quiet:
    every note of every round paid exactly once, to its payee (or, refunded, to its
    depositor); every deposit paid out in full; nothing left in the pool."""
    rows, _ = load_rows(ledger_bytes, "ledger")
    out: list[Violation] = []
    notes: dict[tuple[int, int], list[LedgerRow]] = defaultdict(list)
    for r in rows:
        if r.sender == MIXER_POOL:
            parsed = parse_note_tx_id(r.tx_id)
            if parsed is None:
                out.append(Violation("mixer_row", f"{_fmt_row(r)} is not a payout note"))
                continue
            notes[(parsed[0], parsed[1])].append(r)
    planned: dict[tuple[int, int], tuple[str, int, str, str]] = {}
    in_round: set[tuple[str, str]] = set()
    refunded: set[tuple[int, int]] = set()
    for e in journal:
        if e["e"] == "round":
            for i, (payee, amount, payer, tx, refund) in enumerate(e["notes"]):
                planned[(e["id"], i)] = (payee, amount, payer, tx)
                if refund:
                    refunded.add((e["id"], i))
            in_round.update((p, t) for p, t in e["deposits"])
        elif e["e"] == "attempt" and e.get("refund"):
            refunded.add((e["round"], e["note"]))
    paid_per_deposit: dict[tuple[str, str], int] = defaultdict(int)
    for key, rs in sorted(notes.items()):
        if len(rs) > 1:
            out.append(Violation("payout_twice", f"note {key} paid {len(rs)} times: "
                                 + "; ".join(_fmt_row(r) for r in rs)))
        plan = planned.get(key)
        if plan is None:
            out.append(Violation("payout_unplanned", f"{_fmt_row(rs[0])} is in no round"))
            continue
        payee, amount, payer, tx = plan
        allowed = {payee, payer} if key in refunded else {payee}
        for r in rs:
            if r.receiver not in allowed or r.amount != amount:
                out.append(Violation("payout_wrong", f"{_fmt_row(r)}; planned {payee} "
                                     f"{format_amount(amount)}"))
        paid_per_deposit[(payer, tx)] += rs[0].amount
    for key in planned:
        if key not in notes:
            out.append(Violation("stranded_deposit", f"note {key} of round {key[0]} was "
                                 "never paid"))
    for r in rows:
        if r.receiver == MIXER_POOL and not r.sender.startswith("_"):
            dep = (r.sender, r.tx_id)
            if dep not in in_round:
                out.append(Violation("stranded_deposit", f"{_fmt_row(r)} is in no round"))
            elif paid_per_deposit[dep] != r.amount:
                out.append(Violation("stranded_deposit", f"{_fmt_row(r)}: "
                                     f"{format_amount(paid_per_deposit[dep])} paid out"))
    pool = (sum(r.amount for r in rows if r.receiver == MIXER_POOL)
            - sum(r.amount for r in rows if r.sender == MIXER_POOL))
    if pool:
        out.append(Violation("stranded_deposit", f"the pool still holds {format_amount(pool)}"))
    return out
