"""Balances and holds: the router's cache of the ledger, pure (no I/O, no clock).

Rules (DESIGN §1, §2):
- money only moves in `apply`, which is called for a row the ledger has made durable
  (or while replaying the ledger); the sum of all balances, `_issuer` included, is 0;
- a *hold* reserves part of a sender's balance for a payment in flight. `available` is
  balance minus holds, and `funds_available` compares against it. The check and
  `place_hold` are plain synchronous calls, so on one event loop two payments can never
  spend the same money (there is no `await` between them);
- no account but `_issuer` may go negative (pools such as `_mixer` may not either): `place_hold` refuses to
  reserve more than is available, and `apply` refuses to move unheld money out of a
  payer's account. A refusal raises and changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from common.errors import InvariantViolation, JackPayError
from common.messages import ISSUER


def is_reserved(account: str) -> bool:
    """Reserved accounts (`_issuer`, ...) start with `_`; no payer id may."""
    return account.startswith("_")


class InsufficientFunds(JackPayError):
    """`place_hold` was asked for more than the sender's available funds."""


class Accounts:
    """Balances, holds and last transaction time per account (minor units)."""

    def __init__(self) -> None:
        self._balance: dict[str, int] = defaultdict(int)
        self._held: dict[str, int] = defaultdict(int)
        self._last_tx_time: dict[str, str] = {}

    # --- reading -------------------------------------------------------------------

    def balance(self, account: str) -> int:
        return self._balance.get(account, 0)

    def held(self, account: str) -> int:
        return self._held.get(account, 0)

    def available(self, account: str) -> int:
        """Balance minus every hold on it."""
        return self.balance(account) - self.held(account)

    def last_tx_time(self, account: str) -> str | None:
        return self._last_tx_time.get(account)

    def total(self) -> int:
        """Sum of all balances, `_issuer` included; 0 unless there is a bug."""
        return sum(self._balance.values())

    def total_held(self) -> int:
        return sum(self._held.values())

    def snapshot(self) -> dict[str, int]:
        """Every balance that is not zero (and `_issuer`'s)."""
        return {k: v for k, v in self._balance.items() if v or k == ISSUER}

    def holds(self) -> dict[str, int]:
        """Total held per account, for accounts with a hold."""
        return {k: v for k, v in self._held.items() if v}

    def load(self, balances: Iterable[tuple[str, int]]) -> None:
        """Start from these balances (the ledger's, after its last row). Raises
        InvariantViolation (nothing loaded) if they do not sum to zero or an account
        other than `_issuer` is negative."""
        loaded = dict(balances)
        if sum(loaded.values()) != 0:
            raise InvariantViolation(f"the balances sum to {sum(loaded.values())}, not 0")
        negative = [a for a, v in loaded.items() if v < 0 and a != ISSUER]
        if negative:
            raise InvariantViolation(f"{negative[0]} has a negative balance "
                                     f"({loaded[negative[0]]})")
        self._balance.clear()
        self._balance.update(loaded)

    def touch(self, account: str, tx_time: str) -> None:
        """`account` took part in a payment at `tx_time` (a row read back from the
        ledger): its last transaction time unless it has a later one (ISO 8601 UTC
        strings order as times)."""
        if tx_time > self._last_tx_time.get(account, ""):
            self._last_tx_time[account] = tx_time

    # --- the seed's fundsAvail -----------------------------------------------------

    def funds_available(self, sender: str, amount: int) -> bool:
        """Can `sender` pay `amount` now? `_issuer` always can (it issues); every other
        account, pools such as `_mixer` included, only from what it holds."""
        return sender == ISSUER or self.available(sender) >= amount

    # --- holds -----------------------------------------------------------------------

    def place_hold(self, sender: str, amount: int) -> None:
        """Reserve `amount` of `sender`'s available funds.

        Raises InsufficientFunds (nothing held) when `funds_available` is false.
        """
        if amount <= 0:
            raise InvariantViolation(f"hold of {amount} for {sender}")
        if not self.funds_available(sender, amount):
            raise InsufficientFunds(sender)
        self._held[sender] += amount

    def release_hold(self, sender: str, amount: int) -> None:
        """Give back a hold placed with `place_hold`. Raises InvariantViolation if there
        is no such hold (a double release is a bug)."""
        held = self._held.get(sender, 0)
        if amount <= 0 or held < amount:
            raise InvariantViolation(f"release of {amount} for {sender}, who holds {held}")
        if held == amount:
            del self._held[sender]
        else:
            self._held[sender] = held - amount

    # --- moving money ----------------------------------------------------------------

    def apply(self, sender: str, receiver: str, amount: int, *, held: bool,
              tx_time: str | None = None) -> None:
        """Move `amount` from sender to receiver for a durable ledger row.

        `held`: the payment placed a hold on the sender, released here. Replayed rows
        are applied with held=False. Raises InvariantViolation (nothing changed) when a
        payer would go negative or the hold is missing.
        """
        if amount <= 0 or sender == receiver:
            raise InvariantViolation(f"row {sender}->{receiver} of {amount}")
        if held and self._held.get(sender, 0) < amount:
            raise InvariantViolation(f"apply without a hold of {amount} on {sender}")
        new_sender = self.balance(sender) - amount
        if new_sender < 0 and sender != ISSUER:
            raise InvariantViolation(f"{sender} would go negative ({new_sender})")
        if held:
            self.release_hold(sender, amount)
        self._balance[sender] = new_sender
        self._balance[receiver] += amount
        if tx_time is not None:
            self._last_tx_time[sender] = tx_time
            self._last_tx_time[receiver] = tx_time
