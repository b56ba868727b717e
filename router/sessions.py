"""The registry of participants and their live sessions (the seed's `activePayers`).

Rules:
- the participants come from the network config (with the changes made at run time,
  common.participants); nobody else can say hello as a payer. `put` and `remove` change
  them at run time (router/participants.py);
- a suspended participant stays a participant (it may be named, its balance is kept), but
  `suspended` names it: no payment to or from it starts, and it cannot log in;
- a payer has at most one live session. A new hello for the same payer replaces the old
  session: the old one is told `session_replaced` and closed (by the caller);
- a session leaves the registry when its connection closes, but only if it is still the
  current one (a replaced session's late close must not remove its successor);
- each payer has one request budget (a TokenBucket), kept across its sessions, so
  reconnecting does not refill it.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.aio import Channel
from common.limits import TokenBucket
from common.participants import Participant
from router.accounts import is_reserved


@dataclass(eq=False, slots=True)
class Session:
    payer_id: str
    channel: Channel
    key: bytes | None = None  # the raw public key the login proved (None: plain benchmark)

    @property
    def live(self) -> bool:
        return not self.channel.closed


class Registry:
    def __init__(self, participants: list[Participant], requests_per_s: float = 2000.0) -> None:
        self._participants = {p.id: p for p in participants}
        self.suspended: frozenset[str] = frozenset(p.id for p in participants if p.suspended)
        self._sessions: dict[str, Session] = {}
        self.requests_per_s = requests_per_s
        self._buckets: dict[str, TokenBucket] = {}

    def budget(self, payer_id: str, now: float) -> TokenBucket:
        """The payer's request budget (made full on first use)."""
        bucket = self._buckets.get(payer_id)
        if bucket is None:
            bucket = self._buckets[payer_id] = TokenBucket(self.requests_per_s, now)
        return bucket

    def receiver_exists(self, payer_id: str) -> bool:
        """The seed's receiverExists: is `payer_id` a participant of this network?"""
        return not is_reserved(payer_id) and payer_id in self._participants

    def participant(self, payer_id: str) -> Participant | None:
        return self._participants.get(payer_id)

    @property
    def participants(self) -> list[Participant]:
        return list(self._participants.values())

    def put(self, participant: Participant) -> None:
        """Add a participant, or replace its record (e.g. suspended or resumed)."""
        self._participants[participant.id] = participant
        self._note_suspended()

    def remove(self, payer_id: str) -> Participant | None:
        """It is no participant from now on (its balance stays in the book)."""
        gone = self._participants.pop(payer_id, None)
        self._note_suspended()
        return gone

    def _note_suspended(self) -> None:
        self.suspended = frozenset(p.id for p in self._participants.values() if p.suspended)

    def session(self, payer_id: str) -> Session | None:
        """The payer's live session, if any."""
        s = self._sessions.get(payer_id)
        return s if s is not None and s.live else None

    def attach(self, payer_id: str, channel: Channel, key: bytes | None = None
               ) -> tuple[Session, Session | None]:
        """Make `channel` the payer's session (proven with `key`); returns (new,
        replaced-or-None)."""
        old = self._sessions.get(payer_id)
        new = Session(payer_id, channel, key)
        self._sessions[payer_id] = new
        return new, (old if old is not None and old.live else None)

    def detach(self, session: Session) -> bool:
        """Forget `session` if it is still the payer's current one."""
        if self._sessions.get(session.payer_id) is session:
            del self._sessions[session.payer_id]
            return True
        return False

    def live_sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.live]
