"""`jackpay-mixer report LEDGER [--journal FILE] [--json]`: how private the mixer was.

From the ledger alone (what anyone holding the file sees), per payout — the notes one
payee received in one round, grouped — the anonymity set k: the distinct payers whose
deposits could have funded it, by amount and by time. An attacker who knows how the
mixer works knows that a round of amount A pays out only deposits of exactly A made since
the previous round of A; A is the greatest common divisor of what the round's payees
received. k is counted over those deposits, never over the round's size.

Then simple linking attacks, each guessing the payer of every payout from the ledger
alone: first-in-first-out, amount matching (a deposit equal to what the payee received in
total), timing (the last deposit before the payout) and intersection (the payer found
most often among the candidates of all the payee's payouts: repeated pairs). With the
mixer's journal (ground truth, for tests) the report scores them; on a ledger of direct
payments each row names its payer and every attack scores 100%.

Exit status: 0, or 1 when a check fails (a payout with k < K, a row linking a mixed
payer to its payee, money left in the pool), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.messages import LedgerRow
from common.version import add_version
from jackpay_plugins.mixer.journal import Journal, JournalCorrupt
from jackpay_plugins.mixer.pool import POOL, entropy_bits, parse_note_tx_id
from ledger.store import LedgerCorrupt, load_rows


@dataclass(slots=True)
class Dep:
    seq: int
    at: float
    payer: str
    amount: int
    tx_id: str


@dataclass(slots=True)
class Payout:
    """What one payee received in one round."""

    round_id: int
    payee: str
    total: int = 0
    first_seq: int = 0
    at: float = 0.0
    notes: list[LedgerRow] = field(default_factory=list)
    candidates: list[Dep] = field(default_factory=list)
    truth: set[str] = field(default_factory=set)  # from the journal, if given


def _epoch(dtg: str) -> float:
    return datetime.strptime(dtg, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def analyse(rows: list[LedgerRow], journal: list[dict[str, Any]] | None = None,
            min_payers: int = 5) -> dict[str, Any]:
    """The whole report as a dict (see the module doc). Pure."""
    deposits = [Dep(r.seq, _epoch(r.dtg), r.sender, r.amount, r.tx_id) for r in rows
                if r.receiver == POOL and not r.sender.startswith("_")]
    payouts: dict[tuple[int, str], Payout] = {}
    for r in rows:
        if r.sender != POOL:
            continue
        parsed = parse_note_tx_id(r.tx_id)
        if parsed is None:
            continue
        p = payouts.setdefault((parsed[0], r.receiver), Payout(parsed[0], r.receiver))
        if not p.notes:
            p.first_seq, p.at = r.seq, _epoch(r.dtg)
        p.notes.append(r)
        p.total += r.amount
    direct = [r for r in rows if not r.sender.startswith("_") and not r.receiver.startswith("_")]

    # --- candidates: deposits of the round's amount since the previous round of it ----------
    by_round: dict[int, list[Payout]] = defaultdict(list)
    for p in payouts.values():
        by_round[p.round_id].append(p)
    round_amount = {rid: math.gcd(*[p.total for p in ps]) for rid, ps in by_round.items()}
    round_first = {rid: min(p.first_seq for p in ps) for rid, ps in by_round.items()}
    previous_of_amount: dict[int, int] = {}
    prev_seq: dict[int, int] = {}
    for rid in sorted(by_round, key=lambda r: round_first[r]):
        amount = round_amount[rid]
        prev_seq[rid] = previous_of_amount.get(amount, 0)
        previous_of_amount[amount] = round_first[rid]
    for p in payouts.values():
        amount, lo, hi = round_amount[p.round_id], prev_seq[p.round_id], round_first[p.round_id]
        p.candidates = [d for d in deposits if d.amount == amount and lo < d.seq < hi]

    # --- ground truth --------------------------------------------------------------------
    intents: dict[tuple[str, str], str] = {}
    if journal is not None:
        note_payer: dict[tuple[int, int], str] = {}
        for e in journal:
            if e["e"] == "intent":
                intents[(e["payer"], e["tx"])] = e["payee"]
            elif e["e"] == "round":
                for i, (payee, _amount, payer, _tx, _refund) in enumerate(e["notes"]):
                    note_payer[(e["id"], i)] = payer
                    if (e["id"], payee) in payouts:
                        payouts[(e["id"], payee)].truth.add(payer)
            elif e["e"] == "attempt" and e.get("refund"):
                # A note retried as a refund goes back to its depositor.
                payer = note_payer.get((e["round"], e["note"]))
                if payer is not None and (e["round"], payer) in payouts:
                    payouts[(e["round"], payer)].truth.add(payer)

    groups = sorted(payouts.values(), key=lambda p: p.first_seq)
    ks = [len({d.payer for d in p.candidates}) for p in groups]
    eff = [2 ** entropy_bits(Counter(d.payer for d in p.candidates).values()) for p in groups]

    attacks = run_linkers(groups)
    scored = [p for p in groups if p.truth]

    # --- checks ------------------------------------------------------------------------------
    linked_rows = []
    if journal is not None:
        mixed = {(payer, tx) for (payer, tx) in intents
                 if any(d.payer == payer and d.tx_id == tx for d in deposits)}
        for r in rows:
            for payer, tx in mixed:
                payee = intents[(payer, tx)]
                if {r.sender, r.receiver} == {payer, payee} and r.tx_id == tx:
                    linked_rows.append(r.seq)
                if r.sender == POOL and r.receiver == payee and (tx in r.tx_id or r.memo):
                    linked_rows.append(r.seq)
    pool_balance = (sum(r.amount for r in rows if r.receiver == POOL)
                    - sum(r.amount for r in rows if r.sender == POOL))
    unique_amounts = 0
    for ps in by_round.values():
        amounts = Counter(n.amount for p in ps for n in p.notes)
        unique_amounts += sum(1 for n in amounts.values() if n == 1) if len(ps) > 1 else 0
    delays = []
    for p in groups:
        if p.candidates:
            delays.append(p.at - max(d.at for d in p.candidates))
    low_k = sum(1 for k in ks if k < min_payers)
    return {
        "deposits": len(deposits),
        "payouts": len(groups),
        "payout_notes": sum(len(p.notes) for p in groups),
        "rounds": len(by_round),
        "direct_payments": len(direct),
        "k": {"min": min(ks) if ks else None, "p5": _pct([float(k) for k in ks], 0.05) if ks else None,
              "median": statistics.median(ks) if ks else None},
        "effective_set": {"min": round(min(eff), 2) if eff else None,
                          "median": round(statistics.median(eff), 2) if eff else None},
        "payouts_below_k": low_k,
        "attacks": attacks,
        "attack_bound": round(1 / min_payers + 0.05, 4),
        "scored_payouts": len(scored),
        "rows_linking_payer_to_payee": sorted(set(linked_rows)),
        "pool_balance": pool_balance,
        "unique_note_amounts_in_rounds": unique_amounts,
        "payout_delay_s": {"p50": round(_pct(delays, 0.5), 2), "p95": round(_pct(delays, 0.95), 2)},
        "ok": low_k == 0 and not linked_rows and pool_balance == 0,
    }


def run_linkers(groups: list[Payout]) -> dict[str, float | None]:
    """Each attack guesses one payer per payout from its candidates (the ledger alone);
    scored against `truth` where known (None: nothing to score)."""
    guesses: dict[str, list[str | None]] = {"fifo": [], "amount": [], "timing": [],
                                             "intersection": []}
    used: set[int] = set()
    for p in groups:
        fresh = [d for d in p.candidates if d.seq not in used]
        first = fresh[0] if fresh else (p.candidates[0] if p.candidates else None)
        if first is not None:
            used.add(first.seq)
        guesses["fifo"].append(first.payer if first else None)
        exact = [d for d in p.candidates if d.amount == p.total] or p.candidates
        guesses["amount"].append(exact[0].payer if exact else None)
        guesses["timing"].append(p.candidates[-1].payer if p.candidates else None)
    seen_by_payee: dict[str, Counter[str]] = defaultdict(Counter)
    for p in groups:
        seen_by_payee[p.payee].update({d.payer for d in p.candidates})
    for p in groups:
        counts = seen_by_payee[p.payee]
        names = sorted({d.payer for d in p.candidates}, key=lambda name: (-counts[name], name))
        guesses["intersection"].append(names[0] if names else None)
    scored = [p for p in groups if p.truth]
    attacks: dict[str, float | None] = {}
    for name, guessed in guesses.items():
        if not scored:
            attacks[name] = None
            continue
        hits = sum(1 for p, g in zip(groups, guessed, strict=True) if p.truth and g in p.truth)
        attacks[name] = round(hits / len(scored), 4)
    return attacks


def direct_attacks(rows: list[LedgerRow]) -> dict[str, float | None]:
    """The same attacks on payments sent without the mixer: every row between two
    participants is a payout whose only candidate is the row's sender (the truth)."""
    groups = []
    for r in rows:
        if r.sender.startswith("_") or r.receiver.startswith("_"):
            continue
        dep = Dep(r.seq, _epoch(r.dtg), r.sender, r.amount, r.tx_id)
        groups.append(Payout(r.seq, r.receiver, r.amount, r.seq, dep.at, [r], [dep],
                             {r.sender}))
    return run_linkers(groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jackpay-mixer", description=__doc__.split("\n")[0])
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="anonymity sets and linking attacks over a ledger")
    rep.add_argument("ledger", help="the ledger CSV file")
    rep.add_argument("--journal", help="the mixer's journal (ground truth for the attacks)")
    rep.add_argument("--min-payers", type=int, default=5, help="K the mixer ran with (5)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        data = Path(args.ledger).read_bytes()
        rows, _ = load_rows(data, args.ledger)
        journal = Journal(Path(args.journal)).read() if args.journal else None
    except OSError as exc:
        print(f"jackpay-mixer: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except (LedgerCorrupt, JournalCorrupt) as exc:
        print(f"jackpay-mixer: {exc}", file=sys.stderr)
        return 2
    report = analyse(rows, journal, args.min_payers)
    report["attacks_without_mixer"] = direct_attacks(rows)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if report["ok"] else 1


def _print(r: dict[str, Any]) -> None:
    k, eff = r["k"], r["effective_set"]
    print(f"deposits {r['deposits']}, rounds {r['rounds']}, payouts {r['payouts']} "
          f"({r['payout_notes']} notes), direct payments {r['direct_payments']}")
    print(f"anonymity set k: min {k['min']}, p5 {k['p5']}, median {k['median']}; "
          f"effective 2^H: min {eff['min']}, median {eff['median']}")
    print(f"payouts with k below K: {r['payouts_below_k']}")
    print(f"linking attacks (ledger alone; bound 1/K + 0.05 = {r['attack_bound']}):")
    for name, score in r["attacks"].items():
        shown = "n/a (no journal)" if score is None else f"{score:.1%}"
        print(f"  {name:<13} {shown}")
    print(f"rows linking a mixed payer to its payee: {len(r['rows_linking_payer_to_payee'])}")
    print(f"pool balance: {r['pool_balance']}; payout delay p50 {r['payout_delay_s']['p50']} s, "
          f"p95 {r['payout_delay_s']['p95']} s")
    print("OK" if r["ok"] else "FAILED")


if __name__ == "__main__":
    sys.exit(main())
