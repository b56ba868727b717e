"""The payer's acceptance policy for incoming offers: a pure function, no I/O.

A participant may set `max_incoming` in the network config; an offer above it is
rejected with a reason a person can read (the sender then gets `receiver_rejected`).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.money import format_amount


@dataclass(frozen=True, slots=True)
class AcceptancePolicy:
    """`max_incoming_minor` None means: accept any amount."""

    payer_id: str
    max_incoming_minor: int | None = None

    def decide(self, sender: str, amount_minor: int) -> str | None:
        """None to accept, else the reason to reject."""
        limit = self.max_incoming_minor
        if limit is not None and amount_minor > limit:
            return (f"{format_amount(amount_minor)} from {sender} is above {self.payer_id}'s "
                    f"limit of {format_amount(limit)} per incoming payment")
        return None
