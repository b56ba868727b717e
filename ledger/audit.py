"""`jackpay-ledger verify FILE --keys CONFIG`: prove, offline, that every debit in the
ledger was ordered by its payer and every credit accepted by its receiver. Pure: rows
and public keys in, a verdict out (no files, no clock).

Rules, row by row, once signing began (the first row that carries a signature; rows
before it were written before signed payments and are counted as `unsigned`, never
passed off as signed):
- a row debiting a participant carries the participant's signature of that row (tag
  jackpay-pay-v1, common/signing.py) — or it is an extra leg (`_leg<n>:<tx_id>`) of a
  payment whose main row, in the same group right after it, is signed by the same payer
  (a fee is authorised by the payment it belongs to);
- a row crediting a participant carries the participant's acceptance (tag
  jackpay-receipt-v1), except an opening balance (`_open:<id>`);
- a row debiting `_issuer` (an opening balance) carries the issuer's signature (its key
  lives off the router: `jackpay-keys` signs the openings of the config), and a row
  debiting another system account (a pool such as `_mixer`) carries the router's
  pool-signer signature; without those public keys such rows are counted as `system`,
  reported, not proven;
- a system account other than `_issuer` never pays out more than was paid into it (its
  balance never goes below zero), from the first row on.
The first row that breaks a rule is named and the audit stops there.

What it cannot see: a row removed, or an unsigned row inserted before signing began,
with the whole chain recomputed after it — the payers' receipts are the defence there.
Keys: a row verifies with the participant's key valid when it was written — the current
one, or one retired by `jackpay-keys --rotate` after the row (kept with its end of validity
in `keys/public/payers/<id>.retired.json`), or the one retired within a minute before it
(signed before the rotation, written just after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import JackPayError
from common.messages import DTG_FORMAT, ISSUER, LedgerRow
from common.signing import OPENING_PREFIX, PAY_TAG, RECEIPT_TAG, verify
from ledger.index import LEG_PREFIX

ROTATION_GRACE = timedelta(seconds=60)


def _plus(dtg: str, delta: timedelta) -> str:
    return (datetime.strptime(dtg, DTG_FORMAT) + delta).strftime(DTG_FORMAT)


class MissingKey(JackPayError):
    """A participant's signature must be checked and its public key was not given."""


@dataclass(slots=True)
class AuditCounts:
    unsigned: int = 0  # before signing began
    ordered: int = 0  # debits of participants signed by them
    issued: int = 0  # debits of `_issuer` signed by the issuer
    pooled: int = 0  # debits of other system accounts signed by the router
    legs: int = 0  # extra legs authorised by their payment's signed main row
    accepted: int = 0  # credits of participants signed by them
    openings: int = 0  # opening balances (credited without a receipt)
    system: int = 0  # debits of system accounts (not proven yet)


@dataclass(slots=True)
class SignatureAudit:
    """Feed every row in seq order (`add`), then `finish`. `problem` is the first broken
    rule ("row N: …"), None while all hold."""

    network_id: str
    participants: frozenset[str]
    keys: dict[str, Ed25519PublicKey]  # the participants' public keys (a missing one fails)
    # Each participant's retired keys: (valid until, key), oldest first (jackpay-keys
    # --rotate keeps them). A row verifies with the key valid when it was written.
    retired: dict[str, list[tuple[str, Ed25519PublicKey]]] = field(default_factory=dict)
    issuer: Ed25519PublicKey | None = None  # signs `_issuer`'s debits (openings)
    pool_signer: Ed25519PublicKey | None = None  # the router's: signs other system debits
    counts: AuditCounts = field(default_factory=AuditCounts)
    pools: dict[str, int] = field(default_factory=dict)  # system accounts' balances
    problem: str | None = None
    signing: bool = False  # a signed row has been seen
    _legs: list[LedgerRow] = field(default_factory=list)  # waiting for their main row

    def add(self, row: LedgerRow) -> None:
        if self.problem is not None:
            return
        try:
            self._add(row)
        except MissingKey as exc:
            self.problem = (f"row {row.seq}: no public key for participant {exc.args[0]}, "
                            "whose signature it carries")

    def _add(self, row: LedgerRow) -> None:
        self._pool_balances(row)
        if self.problem is not None:
            return
        if not self.signing and (row.sender_sig or row.receiver_sig):
            self.signing = True
        if not self.signing:
            self.counts.unsigned += 1
            return
        if row.tx_id.startswith(LEG_PREFIX):
            self._legs.append(row)
            return
        self._check(row)
        self._close_group(row)

    def _pool_balances(self, row: LedgerRow) -> None:
        pools = self.pools
        for account, delta in ((row.sender, -row.amount), (row.receiver, row.amount)):
            if account.startswith("_") and account != ISSUER:
                pools[account] = pools.get(account, 0) + delta
        if row.sender in pools and pools[row.sender] < 0:
            self.problem = (f"row {row.seq}: {row.sender} pays out more than was paid into it "
                            f"({pools[row.sender]} minor units below zero)")

    def finish(self) -> str | None:
        if self.problem is None and self._legs:
            leg = self._legs[0]
            self.problem = f"row {leg.seq}: extra leg {leg.tx_id} has no main row after it"
        return self.problem

    def _close_group(self, main: LedgerRow) -> None:
        legs, self._legs = self._legs, []
        for leg in legs:
            if self.problem is not None:
                return
            own = leg.tx_id.split(":", 1)[-1]
            if leg.sender in self.participants:
                if leg.sender != main.sender or own != main.tx_id or not main.sender_sig:
                    self.problem = (f"row {leg.seq}: {leg.sender}'s debit {leg.tx_id} is not "
                                    "part of a payment it signed")
                    return
                self.counts.legs += 1
            else:
                self._check_system(leg)
            self._check_credit(leg)

    def _check(self, row: LedgerRow) -> None:
        sender = row.sender
        if sender in self.participants:
            if not self._signed_by(sender, "sender", row.sender_sig, PAY_TAG, row,
                                   f"{sender}'s debit (tx_id {row.tx_id}) is not signed by "
                                   f"{sender}: a payment its payer never ordered"):
                return
            self.counts.ordered += 1
        else:
            self._check_system(row)
            if self.problem is not None:
                return
        self._check_credit(row)

    def _check_system(self, row: LedgerRow) -> None:
        """A debit of a system account: the issuer's (openings) or the router's (pools)."""
        key, who = ((self.issuer, "the issuer") if row.sender == ISSUER
                    else (self.pool_signer, "the router's pool-signer"))
        if key is None:
            self.counts.system += 1
            return
        if row.sender_sig is None or not verify(key, row.sender_sig, PAY_TAG, self.network_id,
                                                row.sender, row.tx_id, row.receiver,
                                                row.amount, row.memo):
            how = "not signed" if row.sender_sig is None else "signed by another key than"
            self.problem = (f"row {row.seq}: {row.sender}'s debit (tx_id {row.tx_id}) is {how} "
                            f"{who} key: money {'minted' if row.sender == ISSUER else 'moved'} "
                            "without its authority")
            return
        if row.sender == ISSUER:
            self.counts.issued += 1
        else:
            self.counts.pooled += 1

    def _check_credit(self, row: LedgerRow) -> None:
        receiver = row.receiver
        if self.problem is not None or receiver not in self.participants:
            return
        if row.tx_id.startswith(OPENING_PREFIX):
            self.counts.openings += 1
            return
        if self._signed_by(receiver, "receiver", row.receiver_sig, RECEIPT_TAG, row,
                           f"{receiver}'s credit (tx_id {row.tx_id}) carries no acceptance "
                           f"signed by {receiver}"):
            self.counts.accepted += 1

    def _signed_by(self, who: str, role: str, sig: bytes | None, tag: bytes, row: LedgerRow,
                   unsigned: str) -> bool:
        """Whether participant `who` signed the row (as its `role`); else `problem`."""
        if sig is None:
            self.problem = f"row {row.seq}: {unsigned}"
            return False
        if not self._verify(who, sig, tag, row):
            self.problem = (f"row {row.seq}: the {role}'s signature does not verify with "
                            f"{who}'s key (the row was changed, or signed by another key)")
            return False
        return True

    def _verify(self, who: str, sig: bytes, tag: bytes, row: LedgerRow) -> bool:
        keys = self._keys_at(who, row.dtg)
        if not keys:
            raise MissingKey(who)
        return any(verify(key, sig, tag, self.network_id, row.sender, row.tx_id, row.receiver,
                          row.amount, row.memo) for key in keys)

    def _keys_at(self, who: str, dtg: str) -> list[Ed25519PublicKey]:
        """The key valid at `dtg` (a row's time); and the one retired just before, within
        ROTATION_GRACE (a payment signed before the rotation, written just after it)."""
        keys: list[Ed25519PublicKey] = []
        for until, key in self.retired.get(who, ()):
            if dtg < until:
                return [*keys, key]
            keys = [key] if dtg < _plus(until, ROTATION_GRACE) else []
        current = self.keys.get(who)
        return [*keys, current] if current is not None else keys

    def summary(self) -> str:
        c = self.counts
        return (f"signatures: {c.ordered} debits signed by their payers, {c.legs} legs of "
                f"signed payments, {c.accepted} credits accepted by their receivers, "
                f"{c.issued} openings signed by the issuer, {c.pooled} pool debits signed by "
                f"the router, {c.system} system debits not proven (no key given), "
                f"{c.unsigned} rows from before signing began")
