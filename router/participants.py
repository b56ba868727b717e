"""Participants at run time: the operator's add, suspend, resume, list and reload.

Rules:
- every change is recorded durably (common.participants: `[network] participants_file`,
  rewritten atomically) *before* it takes effect and before the operator is answered;
  if it cannot be recorded, nothing changes and the operator is told why;
- `add`: a new id (never one that is a participant now), its public key written to
  `keys/public/payers/<id>.pub` (an existing file with another key is refused, never
  replaced) and its opening balance issued once from `_issuer` (`_open:<id>`, as for the
  config's participants). It can log in and pay at once. If the ledger cannot take the
  opening now, the participant is added and the router keeps issuing it;
- `suspend`: no payment to or from it starts (`participant_suspended`), its session is
  closed with that code and it cannot log in; payments already in flight finish; its
  balance is kept. `resume` undoes it — except a suspension written in the config
  (`suspended = true`), which only the config (and a reload) lifts;
- `reload` (also SIGHUP) reads the config file again and applies its participants as a
  restart would — new ones added (openings issued), changed ones updated, removed ones
  no longer participants (sessions closed; balances kept) — without touching other
  sessions or payments in flight. Other settings that changed are reported as needing
  a restart, never half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.config import NetworkConfig, load_config
from common.errors import ConfigError, ErrorCode, JackPayError
from common.files import write_atomically
from common.keys import KeyFileError, public_pem, raw_public
from common.logs import log_event
from common.messages import (
    AddParticipant,
    ParticipantChanged,
    ParticipantInfo,
    ReloadReply,
)
from common.money import format_amount
from common.participants import Participant, ParticipantChanges, load_changes, save_changes
from router.book import opening_row

if TYPE_CHECKING:
    from router.server import RouterService

log = logging.getLogger("jackpay.router.participants")

# How long `add` waits for the opening balance before answering (the router goes on).
OPENING_WAIT_S = 5.0
_SECTIONS = ("network", "ledger", "router", "payer")


class OperatorRefused(JackPayError):
    """The operator's request is refused: answer `code` with the message; nothing changed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes in the participants (pure: `plan_reload`)."""

    added: list[Participant]
    removed: list[str]
    changed: list[Participant]


def plan_reload(running: Iterable[Participant], wanted: Iterable[Participant]) -> ReloadPlan:
    """The participants to add, remove and update to go from `running` to `wanted`."""
    now = {p.id: p for p in running}
    then = {p.id: p for p in wanted}
    return ReloadPlan(added=[p for i, p in then.items() if i not in now],
                      removed=[i for i in now if i not in then],
                      changed=[p for i, p in then.items() if i in now and now[i] != p])


def settings_changed(running: NetworkConfig, wanted: NetworkConfig) -> list[str]:
    """`[section] key` of every setting outside the participants that differs (and
    `[plugins.NAME]` tables), sorted."""
    out = []
    for section in _SECTIONS:
        a = msgspec.structs.asdict(getattr(running, section))
        b = msgspec.structs.asdict(getattr(wanted, section))
        out += [f"[{section}] {k}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    for name in sorted(running.plugins.keys() | wanted.plugins.keys()):
        if running.plugins.get(name) != wanted.plugins.get(name):
            out.append(f"[plugins.{name}]")
    return out


class ParticipantOps:
    """The operator's participant commands on a running router (the admin socket)."""

    def __init__(self, service: RouterService, config_path: Path | None) -> None:
        """Raises ConfigError if the participants file cannot be read."""
        self.service = service
        self.config_path = config_path
        self.path = service.cfg.participants_path
        self.changes = load_changes(self.path)
        self._openings: set[asyncio.Task[None]] = set()

    # --- reading ---------------------------------------------------------------------

    def info(self, p: Participant, configured: set[str] | None = None) -> ParticipantInfo:
        """`configured`: the ids the config file names (read from it when not given)."""
        svc = self.service
        if configured is None:
            configured = {c.id for c in self._configured()}
        accounts = svc.book.accounts
        policy = svc.login_policy
        if policy is not None:
            policy.keys.refresh(p.id)
            has_key = policy.keys.raw(p.id) is not None
        else:
            has_key = svc.keys.payer_public(p.id).is_file()
        return ParticipantInfo(
            id=p.id, name=p.name, kind=p.kind, opening_balance=p.opening_minor,
            max_incoming=p.max_incoming_minor, suspended=p.suspended,
            added_at_run_time=p.id not in configured,
            has_key=has_key, online=svc.registry.session(p.id) is not None,
            balance=accounts.balance(p.id), available=accounts.available(p.id))

    def _configured(self) -> list[Participant]:
        """The config file's own participants (without the run-time changes), as it is
        now; the running ones if the router was started without a file."""
        if self.config_path is None:
            return [p for p in self.service.cfg.participants
                    if not any(a.id == p.id for a in self.changes.added)]
        try:
            return load_config(self.config_path, with_changes=False).participants
        except ConfigError:
            return []

    def listing(self) -> list[ParticipantInfo]:
        configured = {c.id for c in self._configured()}
        return [self.info(p, configured) for p in sorted(self.service.registry.participants,
                                                         key=lambda p: p.id)]

    # --- changes -----------------------------------------------------------------------

    def _record(self, changes: ParticipantChanges) -> None:
        """Make `changes` durable, then current. Raises OperatorRefused (nothing changed)."""
        try:
            save_changes(self.path, changes)
        except OSError as exc:
            raise OperatorRefused(ErrorCode.INTERNAL_ERROR,
                                  f"cannot record the change in {self.path}: "
                                  f"{exc.strerror or exc}; nothing changed") from None
        self.changes = changes

    def _participant(self, payer_id: str) -> Participant:
        p = self.service.registry.participant(payer_id)
        if p is None:
            raise OperatorRefused(ErrorCode.NOT_FOUND,
                                  f"{payer_id} is not a participant of this network")
        return p

    async def add(self, req: AddParticipant) -> ParticipantChanged:
        """Raises OperatorRefused."""
        svc = self.service
        pid = req.payer
        if svc.registry.participant(pid) is not None:
            raise OperatorRefused(ErrorCode.BAD_REQUEST, f"{pid} is already a participant")
        if req.opening_balance > 0 and svc.security.issuer is not None and \
                svc.opening_signatures([opening_row(pid, req.opening_balance)]) == [None]:
            raise OperatorRefused(
                ErrorCode.BAD_REQUEST, f"the opening balance of {pid} is not signed by the "
                "issuer's key (the router never mints): run `jackpay-router participants add` "
                "where keys/private/issuer.key is (it signs the opening), or `jackpay-keys "
                "CONFIG` there after adding the opening to openings.json's participants")
        key_note, written = self._place_key(pid, req.key)
        p = Participant(id=pid, name=req.name, kind=req.kind,
                        opening_balance=format_amount(req.opening_balance),
                        max_incoming=None if req.max_incoming is None
                        else format_amount(req.max_incoming))
        try:
            self._record(ParticipantChanges(
                added=[a for a in self.changes.added if a.id != pid] + [p],
                suspended=[s for s in self.changes.suspended if s != pid]))
        except OperatorRefused:
            if written is not None:  # nothing changed: not the key file either
                written.unlink(missing_ok=True)
            raise
        self._admit(p)
        log_event(log, "participant added", payer=pid, kind=p.kind,
                  opening_balance=p.opening_balance, key=req.key is not None)
        notes = [key_note]
        opening = self._start_opening(p)
        if opening is not None:
            done, _ = await asyncio.wait({opening}, timeout=OPENING_WAIT_S)
            if not done:
                notes.append("opening balance not issued yet (the ledger does not answer); "
                             "the router keeps trying")
            elif opening.exception() is not None:
                notes.append(f"opening balance not issued: {opening.exception()}")
        return ParticipantChanged(re=req.id, participant=self.info(p),
                                  note="; ".join(n for n in notes if n))

    def _place_key(self, pid: str, key: bytes | None) -> tuple[str, Path | None]:
        """Write the participant's public key file (or check the one there). Returns a
        note for the operator and the file if this call wrote it. Raises OperatorRefused."""
        keys = self.service.keys
        path = keys.payer_public(pid)
        if key is None:
            if path.exists():
                return "", None
            return f"no key yet: run `jackpay-keys CONFIG` to make {pid}'s key pair", None
        try:
            wanted = Ed25519PublicKey.from_public_bytes(key)
        except ValueError:
            raise OperatorRefused(ErrorCode.BAD_REQUEST, "not an Ed25519 public key") from None
        if path.exists():
            try:
                there = raw_public(keys.load_payer_public(pid))
            except KeyFileError as exc:
                raise OperatorRefused(ErrorCode.BAD_REQUEST, f"{exc}; remove it first") from None
            if there != key:
                raise OperatorRefused(ErrorCode.BAD_REQUEST,
                                      f"{path} holds another key; remove it first (or add "
                                      "without a key to keep it)")
            return "", None
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_atomically(path, public_pem(wanted), 0o644, exclusive=True)
        except OSError as exc:
            raise OperatorRefused(ErrorCode.INTERNAL_ERROR,
                                  f"cannot write {path}: {exc.strerror or exc}") from None
        return "", path

    def _admit(self, p: Participant) -> None:
        """Into the registry and the login keys."""
        svc = self.service
        svc.registry.put(p)
        if svc.login_policy is not None:
            problem = svc.login_policy.keys.add(p.id)
            if problem is not None:
                log_event(log, "participant cannot log in yet", logging.WARNING, payer=p.id,
                          reason=problem)

    def _start_opening(self, p: Participant) -> asyncio.Task[None] | None:
        """Issue the participant's opening balance in a task of its own (it retries until
        the ledger has it; a refusal is logged); None when there is none to issue."""
        if p.opening_minor <= 0:
            return None
        task = asyncio.get_running_loop().create_task(self.service.issue_openings([p]),
                                                      name=f"open:{p.id}")
        self._openings.add(task)
        task.add_done_callback(self._opening_done)
        return task

    def _opening_done(self, task: asyncio.Task[None]) -> None:
        self._openings.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log_event(log, "opening balance not issued", logging.ERROR,
                      task=task.get_name(), error=str(task.exception()))

    def suspend(self, rid: int, payer_id: str) -> ParticipantChanged:
        """Raises OperatorRefused."""
        p = self._participant(payer_id)
        if p.suspended:
            return ParticipantChanged(re=rid, participant=self.info(p), note="already suspended")
        self._record(msgspec.structs.replace(
            self.changes, suspended=[*self.changes.suspended, payer_id]))
        p = msgspec.structs.replace(p, suspended=True)
        self.service.registry.put(p)
        self._close_session(payer_id, ErrorCode.PARTICIPANT_SUSPENDED,
                            "your account is suspended by the network's operator")
        log_event(log, "participant suspended", logging.WARNING, payer=payer_id)
        return ParticipantChanged(re=rid, participant=self.info(p))

    def resume(self, rid: int, payer_id: str) -> ParticipantChanged:
        """Raises OperatorRefused (also for a suspension written in the config)."""
        p = self._participant(payer_id)
        if not p.suspended:
            return ParticipantChanged(re=rid, participant=self.info(p), note="not suspended")
        if any(c.id == payer_id and c.suspended for c in self._configured()):
            raise OperatorRefused(ErrorCode.BAD_REQUEST,
                                  f"{payer_id} is suspended in the config file (`suspended = "
                                  "true`): remove that line, then `jackpay-router reload`")
        self._record(msgspec.structs.replace(
            self.changes, suspended=[s for s in self.changes.suspended if s != payer_id]))
        p = msgspec.structs.replace(p, suspended=False)
        self.service.registry.put(p)
        log_event(log, "participant resumed", payer=payer_id)
        return ParticipantChanged(re=rid, participant=self.info(p),
                                  note="its daemon logs in again at its next try (within "
                                       "[payer] reconnect_max_s)")

    def _close_session(self, payer_id: str, code: ErrorCode, message: str) -> None:
        session = self.service.registry.session(payer_id)
        if session is not None:
            session.channel.reply_error(None, code, message)
            session.channel.close()

    async def reload(self, rid: int = 0) -> ReloadReply:
        """Apply the config file's participants now. Raises OperatorRefused (nothing
        changed) when the file cannot be read or is not valid."""
        if self.config_path is None:
            raise OperatorRefused(ErrorCode.BAD_REQUEST, "this router was started without a "
                                  "config file to reload")
        svc = self.service
        try:
            wanted = load_config(self.config_path)
        except ConfigError as exc:
            raise OperatorRefused(ErrorCode.BAD_REQUEST,
                                  f"{exc}; nothing reloaded") from None
        plan = plan_reload(svc.registry.participants, wanted.participants)
        restart = settings_changed(svc.cfg, wanted)
        for pid in plan.removed:
            svc.registry.remove(pid)
            if svc.login_policy is not None:
                svc.login_policy.keys.remove(pid)
            self._close_session(pid, ErrorCode.FORBIDDEN,
                                "you are no longer a participant of this network")
            log_event(log, "participant removed by reload", logging.WARNING, payer=pid,
                      balance=format_amount(svc.book.accounts.balance(pid)))
        for p in plan.changed:
            svc.registry.put(p)
            if p.suspended:
                self._close_session(p.id, ErrorCode.PARTICIPANT_SUSPENDED,
                                    "your account is suspended by the network's operator")
        for p in plan.added:
            self._admit(p)
        svc.cfg = msgspec.structs.replace(svc.cfg, participants=wanted.participants)
        for p in plan.added:
            self._start_opening(p)
        log_event(log, "reloaded", added=",".join(p.id for p in plan.added) or None,
                  removed=",".join(plan.removed) or None,
                  changed=",".join(p.id for p in plan.changed) or None,
                  restart_needed=", ".join(restart) or None)
        return ReloadReply(re=rid, added=[p.id for p in plan.added], removed=plan.removed,
                           changed=[p.id for p in plan.changed], restart_needed=restart)

    async def aclose(self) -> None:
        for task in list(self._openings):
            task.cancel()
        for task in list(self._openings):
            with contextlib.suppress(asyncio.CancelledError, JackPayError):
                await task


__all__ = ["OperatorRefused", "ParticipantOps", "ReloadPlan", "plan_reload",
           "settings_changed"]
