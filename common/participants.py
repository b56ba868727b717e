"""A participant of the network, and the changes an operator made to them at run time.

The network's participants are its config's `[[participants]]` plus those an operator
added at run time (`jackpay-router participants add`); suspensions are made at run time
(`participants suspend|resume`) or written in the config (`suspended = true`). The
router records the run-time changes in one small JSON file, `[network] participants_file`
(default `participants.json` beside the config), rewritten whole and atomically
(common.files) before it answers the operator, so they survive a restart. `load_config`
merges it, so every tool that reads the config (the payer daemon and CLI, jackpay-keys,
the checker) sees the same participants as the router.

Rules of the merge:
- a participant in the config wins over one of the same id in the file (its record in the
  file is then unused, not an error: the operator made the addition permanent);
- a participant is suspended when the config or the file says so;
- a file that cannot be read or parsed is an error that names the file; a missing file
  means no changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from common.errors import ConfigError
from common.files import write_atomically
from common.messages import PAYER_ID_PATTERN
from common.money import AmountError, parse_amount

Kind = Literal["corporation", "individual", "party", "software", "other"]
KINDS: tuple[str, ...] = ("corporation", "individual", "party", "software", "other")
FORMAT: Literal["jackpay-participants-1"] = "jackpay-participants-1"


class Participant(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=PAYER_ID_PATTERN)]
    name: str = ""  # as written; printed escaped (common.text), new ones checked
    kind: Kind = "individual"
    opening_balance: str = "0.00"
    max_incoming: str | None = None
    # No new payments to or from it, no login (`participant_suspended`); balance kept.
    suspended: bool = False

    def __post_init__(self) -> None:
        try:
            parse_amount(self.opening_balance, allow_zero=True)
            if self.max_incoming is not None:
                parse_amount(self.max_incoming, allow_zero=True)
        except AmountError as exc:
            raise ValueError(f"participant {self.id!r}: {exc}") from None

    @property
    def opening_minor(self) -> int:
        return parse_amount(self.opening_balance, allow_zero=True)

    @property
    def max_incoming_minor(self) -> int | None:
        if self.max_incoming is None:
            return None
        return parse_amount(self.max_incoming, allow_zero=True)


class ParticipantChanges(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What `participants_file` holds: participants added at run time (in the order they
    were added) and the ids suspended at run time."""

    format: Literal["jackpay-participants-1"] = FORMAT
    added: list[Participant] = msgspec.field(default_factory=list)
    suspended: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        ids = [p.id for p in self.added]
        if len(ids) != len(set(ids)):
            raise ValueError("a participant is added twice")


def load_changes(path: Path) -> ParticipantChanges:
    """The run-time changes recorded at `path` (none if it does not exist). Raises
    ConfigError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ParticipantChanges()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return msgspec.json.decode(data, type=ParticipantChanges)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: {exc} (this file records the participants changed at "
                          "run time; the router writes it, `jackpay-router participants` "
                          "changes it)") from None


def save_changes(path: Path, changes: ParticipantChanges) -> None:
    """Write `changes` to `path` durably, replacing what was there. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, msgspec.json.format(msgspec.json.encode(changes)) + b"\n", 0o644)


def merge(configured: list[Participant], changes: ParticipantChanges) -> list[Participant]:
    """The network's participants: the config's, then those added at run time that the
    config does not name; suspended where either says so."""
    known = {p.id for p in configured}
    merged = configured + [p for p in changes.added if p.id not in known]
    if not changes.suspended:
        return merged
    off = set(changes.suspended)
    return [msgspec.structs.replace(p, suspended=True) if p.id in off and not p.suspended
            else p for p in merged]
