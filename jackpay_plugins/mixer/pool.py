"""The mixer's state and rules: pure (no I/O; time and randomness passed in).

Pool and batch, with the router as coordinator (../shared/MIXER.md):
- a mixed payment is a *deposit* `payer → _mixer` of amount A; its payee is known only
  here (and in the journal), never in the ledger;
- deposits wait in a pool per amount (Whirlpool's answer to amount matching: every
  deposit of a round is the same amount, so nothing about A tells them apart). At most
  one deposit per payer per round (a payer's second deposit waits for the next round):
  k counts distinct payers, not notes;
- a round of amount A closes when at least `min_payers` distinct payers wait in its pool
  AND its random delay (drawn when the pool opened) has passed. A pool whose oldest
  deposit has waited `max_wait_s` closes at once; with fewer than K payers that round is
  low-anonymity: its deposits are refunded (`on_timeout = "refund"`, the default) or paid
  out (`"payout"`), flagged;
- a round's payouts are split into fixed denominations and shuffled; each note is a
  system payment `_mixer → payee` whose tx_id is derived from (round, note, attempt), so
  a re-sent payout is a duplicate at the ledger, never a second payment. A note whose
  payment failed is tried again with the next attempt number, once the journal says so;
  after `max_attempts` it is refunded to its depositor instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.signing import MIXER_POOL

POOL = MIXER_POOL  # what payers sign a mixed payment to (common/signing.py)
NOTE_PREFIX = "_mix:"


def note_tx_id(round_id: int, index: int, attempt: int) -> str:
    return f"{NOTE_PREFIX}r{round_id}:n{index}:a{attempt}"


def parse_note_tx_id(tx_id: str) -> tuple[int, int, int] | None:
    """(round, note, attempt) of a payout's tx_id, or None."""
    if not tx_id.startswith(NOTE_PREFIX):
        return None
    try:
        r, n, a = tx_id[len(NOTE_PREFIX):].split(":")
        if r[0] != "r" or n[0] != "n" or a[0] != "a":
            return None
        return int(r[1:]), int(n[1:]), int(a[1:])
    except (ValueError, IndexError):
        return None


def split_into_notes(amount: int, denominations: Iterable[int]) -> list[int]:
    """`amount` as fixed denominations, largest first (greedy). The smallest
    denomination must divide every amount (1 minor unit does)."""
    notes: list[int] = []
    left = amount
    for d in sorted(set(denominations), reverse=True):
        n, left = divmod(left, d)
        notes.extend([d] * n)
    if left:
        raise ValueError(f"{amount} cannot be made of the denominations")
    return notes


@dataclass(frozen=True, slots=True)
class Settings:
    min_payers: int = 5  # K: distinct payers a round needs
    min_delay_s: float = 1.0  # a round's random delay, drawn when its pool opens
    max_delay_s: float = 5.0
    max_wait_s: float = 40.0  # then the pool closes anyway, flagged low-anonymity
    on_timeout: str = "refund"  # or "payout"
    denominations: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000,
                                      10_000, 20_000, 50_000, 100_000, 200_000, 500_000)
    max_waiting_per_payer: int = 20
    retry_s: float = 1.0  # a failed payout note is tried again after this
    max_attempts: int = 30  # then it is refunded to its depositor


@dataclass(slots=True)
class Deposit:
    payer: str
    tx_id: str
    payee: str
    amount: int
    at: float  # when it was committed (epoch seconds)
    seq: int = 0
    round_id: int | None = None


@dataclass(slots=True)
class Note:
    index: int
    payee: str  # who gets it: the deposit's payee, or its payer for a refund
    amount: int
    deposit: tuple[str, str]  # (payer, tx_id)
    refund: bool = False
    attempt: int = 0
    paid_seq: int | None = None
    running: bool = False
    retry_at: float = 0.0

    def tx_id(self, round_id: int) -> str:
        return note_tx_id(round_id, self.index, self.attempt)


@dataclass(slots=True)
class Round:
    id: int
    amount: int
    deposits: list[tuple[str, str]]
    notes: list[Note]
    low_anonymity: bool
    closed_at: float
    unpaid: int = -1  # notes not yet paid (counted at creation)

    def __post_init__(self) -> None:
        self.unpaid = sum(1 for n in self.notes if n.paid_seq is None)

    @property
    def done(self) -> bool:
        return self.unpaid == 0


@dataclass(slots=True)
class Pool:
    """The deposits of one amount waiting for a round."""

    amount: int
    waiting: list[tuple[str, str]] = field(default_factory=list)  # (payer, tx_id), in order
    opened_at: float = 0.0
    delay_s: float = 0.0


class Mixer:
    """Deposits, pools and rounds. The plug-in (plugin.py) journals before it acts."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.SystemRandom()
        self.intents: dict[tuple[str, str], tuple[str, int]] = {}  # (payer, tx) -> payee, amount
        self.deposits: dict[tuple[str, str], Deposit] = {}
        self.pools: dict[int, Pool] = {}
        self.rounds: dict[int, Round] = {}
        self.open_rounds: dict[int, Round] = {}  # with notes not yet paid
        self.waiting_by_payer: dict[str, int] = {}
        self.next_round = 1
        self.paid_out = 0
        self.refunded = 0

    # --- deposits ----------------------------------------------------------------------

    def waiting_of(self, payer: str) -> int:
        """The payer's deposits not yet in a round."""
        return self.waiting_by_payer.get(payer, 0)

    def deposited(self, payer: str, tx_id: str, amount: int, seq: int, at: float) -> Deposit:
        """A deposit row is durable. Its payee comes from the intent journalled before."""
        key = (payer, tx_id)
        known = self.deposits.get(key)
        if known is not None:
            return known
        payee, _ = self.intents.pop(key, (payer, amount))  # no intent: refund it
        dep = Deposit(payer, tx_id, payee, amount, at, seq)
        self.deposits[key] = dep
        self.waiting_by_payer[payer] = self.waiting_by_payer.get(payer, 0) + 1
        pool = self.pools.get(amount)
        if pool is None or not pool.waiting:
            pool = self.pools[amount] = Pool(amount, [], at, self.rng.uniform(
                self.settings.min_delay_s, self.settings.max_delay_s))
        pool.waiting.append(key)
        return dep

    # --- rounds ------------------------------------------------------------------------

    def rounds_due(self, now: float) -> list[tuple[int, list[tuple[str, str]], bool]]:
        """The pools ready to close: (amount, deposits of the round, low_anonymity)."""
        due = []
        s = self.settings
        for amount, pool in self.pools.items():
            if not pool.waiting:
                continue
            chosen: list[tuple[str, str]] = []
            payers: set[str] = set()
            for key in pool.waiting:
                if key[0] not in payers:
                    payers.add(key[0])
                    chosen.append(key)
            enough = len(payers) >= s.min_payers
            if enough and now >= pool.opened_at + pool.delay_s:
                due.append((amount, chosen, False))
            elif now >= self.deposits[pool.waiting[0]].at + s.max_wait_s:
                # The oldest has waited long enough: close now, delay or not; with fewer
                # than K payers the round is low-anonymity.
                due.append((amount, chosen, not enough))
        return due

    def plan_round(self, amount: int, chosen: list[tuple[str, str]], low: bool,
                   now: float) -> Round:
        """The notes of a round, shuffled. Not applied: `apply_round` does that once the
        plan is journalled."""
        refund = low and self.settings.on_timeout == "refund"
        notes: list[tuple[str, int, tuple[str, str], bool]] = []
        for key in chosen:
            dep = self.deposits[key]
            to = dep.payer if refund or dep.payee == dep.payer else dep.payee
            for value in split_into_notes(dep.amount, self.settings.denominations):
                notes.append((to, value, key, refund or to == dep.payer))
        self.rng.shuffle(notes)
        round_id = self.next_round
        return Round(round_id, amount, list(chosen),
                     [Note(i, to, value, key, is_refund)
                      for i, (to, value, key, is_refund) in enumerate(notes)], low, now)

    def apply_round(self, rnd: Round) -> None:
        self.rounds[rnd.id] = rnd
        if not rnd.done:
            self.open_rounds[rnd.id] = rnd
        self.next_round = max(self.next_round, rnd.id + 1)
        taken = set(rnd.deposits)
        for key in rnd.deposits:
            dep = self.deposits.get(key)
            if dep is not None and dep.round_id is None:
                dep.round_id = rnd.id
                left = self.waiting_by_payer[dep.payer] - 1
                if left:
                    self.waiting_by_payer[dep.payer] = left
                else:
                    del self.waiting_by_payer[dep.payer]
        pool = self.pools.get(rnd.amount)
        if pool is not None:
            pool.waiting = [k for k in pool.waiting if k not in taken]
            if pool.waiting:  # the rest start a new wait
                pool.opened_at = rnd.closed_at
                pool.delay_s = self.rng.uniform(self.settings.min_delay_s,
                                                self.settings.max_delay_s)

    # --- notes -------------------------------------------------------------------------

    def notes_to_send(self, now: float) -> list[tuple[Round, Note]]:
        out = []
        for rnd in self.open_rounds.values():
            for note in rnd.notes:
                if note.paid_seq is None and not note.running and now >= note.retry_at:
                    out.append((rnd, note))
        return out

    def note(self, round_id: int, index: int) -> Note | None:
        rnd = self.rounds.get(round_id)
        if rnd is None or index >= len(rnd.notes):
            return None
        return rnd.notes[index]

    def note_paid(self, round_id: int, index: int, seq: int) -> None:
        note = self.note(round_id, index)
        if note is None or note.paid_seq is not None:
            return
        note.paid_seq = seq
        note.running = False
        self.rounds[round_id].unpaid -= 1
        if note.refund:
            self.refunded += note.amount
        else:
            self.paid_out += note.amount
        rnd = self.open_rounds.get(round_id)
        if rnd is not None and rnd.done:
            del self.open_rounds[round_id]

    def next_attempt(self, note: Note) -> tuple[int, bool]:
        """After a failed payment of `note`: (next attempt, refund?) — after
        `max_attempts` to the payee, the depositor gets the note back instead."""
        refund = note.refund or note.attempt + 1 >= self.settings.max_attempts
        return note.attempt + 1, refund

    def retry_later(self, note: Note, now: float) -> None:
        """Send `note`'s current attempt again after `retry_s` (its next one could not be
        journalled)."""
        note.running = False
        note.retry_at = now + self.settings.retry_s

    def set_attempt(self, round_id: int, index: int, attempt: int, refund: bool,
                    now: float) -> None:
        """Journalled: the note is tried again as `attempt` (to its depositor if refund)."""
        note = self.note(round_id, index)
        if note is None or note.paid_seq is not None or attempt <= note.attempt:
            return
        note.attempt = attempt
        note.running = False
        note.retry_at = now + self.settings.retry_s
        if refund and not note.refund:
            note.refund = True
            note.payee = note.deposit[0]

    # --- reading -----------------------------------------------------------------------

    def describe(self, payer: str, tx_id: str) -> tuple[str, str] | None:
        """(state, detail) of a payer's own mixed payment, for its `status`."""
        dep = self.deposits.get((payer, tx_id))
        if dep is None:
            return None
        if dep.round_id is None:
            pool = self.pools.get(dep.amount)
            others = len({k[0] for k in pool.waiting}) if pool else 0
            return ("mixed", f"deposited (row {dep.seq}); waiting for a round: {others} of "
                             f"{self.settings.min_payers} payers so far")
        rnd = self.rounds[dep.round_id]
        mine = [n for n in rnd.notes if n.deposit == (payer, tx_id)]
        paid = [n for n in mine if n.paid_seq is not None]
        refund = all(n.refund for n in mine)
        what = "refunded to you" if refund else f"paid out to {dep.payee}"
        if len(paid) < len(mine):
            return ("mixed", f"deposited (row {dep.seq}); round {rnd.id}: {len(paid)} of "
                             f"{len(mine)} notes {what}")
        rows = ", ".join(str(n.paid_seq) for n in sorted(paid, key=lambda n: n.paid_seq or 0))
        flag = " (low-anonymity round)" if rnd.low_anonymity else ""
        return ("paid", f"{what} in round {rnd.id}{flag}: rows {rows}")

    def pool_owed(self) -> int:
        """What the pool still owes: deposits not yet paid out or refunded."""
        owed = sum(d.amount for d in self.deposits.values())
        return owed - self.paid_out - self.refunded

    def statistics(self) -> dict[str, int]:
        waiting = sum(len(p.waiting) for p in self.pools.values())
        open_notes = sum(1 for r in self.open_rounds.values() for n in r.notes
                         if n.paid_seq is None)
        return {"mixer_deposits": len(self.deposits), "mixer_waiting": waiting,
                "mixer_rounds": len(self.rounds), "mixer_notes_open": open_notes,
                "mixer_low_anonymity_rounds": sum(r.low_anonymity for r in self.rounds.values())}


def entropy_bits(weights: Iterable[float]) -> float:
    """Shannon entropy (bits) of a distribution given by non-negative weights."""
    ws = [w for w in weights if w > 0]
    total = sum(ws)
    return -sum(w / total * math.log2(w / total) for w in ws) if total else 0.0
