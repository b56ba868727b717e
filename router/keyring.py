"""The participants' public keys, as the router checks logins against them.

Rules:
- a participant's key is `<keys>/public/payers/<id>.pub` (common.keys); one without a
  key file cannot log in (logged once at start, and whenever the files change), but may
  still be paid;
- the folder is looked at again (one `stat`) before every login and every second:
  `jackpay-keys --rotate alice` replaces alice's files atomically, which changes the
  folder, so the new key is in force from the next login without a restart, and
  `take_changed` names the participants whose key changed (their live sessions were
  proven with a key that no longer counts: the router closes them).
"""

from __future__ import annotations

import logging
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.keys import KeyFileError, KeyStore, raw_public
from common.logs import log_event

log = logging.getLogger("jackpay.router.keys")


class PayerKeys:
    def __init__(self, store: KeyStore, payer_ids: list[str]) -> None:
        self.store = store
        self.payer_ids = list(payer_ids)
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._raw: dict[str, bytes] = {}
        self._stamp: int | None = None
        self._changed: set[str] = set()

    def get(self, payer_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(payer_id)

    def __len__(self) -> int:
        return len(self._keys)

    def _folder_stamp(self) -> int:
        try:
            return os.stat(self.store.payers_public_dir).st_mtime_ns
        except OSError:
            return -1

    def load(self) -> set[str]:
        """(Re)read every participant's key; returns the ids whose key changed (or went
        away) since the last load."""
        self._stamp = self._folder_stamp()
        keys: dict[str, Ed25519PublicKey] = {}
        raw: dict[str, bytes] = {}
        missing: list[str] = []
        for pid in self.payer_ids:
            try:
                key = self.store.load_payer_public(pid)
            except KeyFileError as exc:
                missing.append(pid)
                if len(missing) <= 5:
                    log_event(log, "participant cannot log in", logging.WARNING, payer=pid,
                              reason=str(exc))
                continue
            keys[pid] = key
            raw[pid] = raw_public(key)
        if len(missing) > 5:
            log_event(log, "participants without a key", logging.WARNING, count=len(missing),
                      hint="run jackpay-keys CONFIG")
        changed = {pid for pid in self._raw if raw.get(pid) != self._raw[pid]}
        self._keys, self._raw = keys, raw
        return changed

    def refresh(self) -> None:
        """Re-read the keys if their folder changed since the last look (the ids whose
        key changed are kept for `take_changed`)."""
        if self._folder_stamp() == self._stamp:
            return
        changed = self.load()
        if changed:
            log_event(log, "participant keys changed", payers=",".join(sorted(changed)))
            self._changed |= changed

    def take_changed(self) -> set[str]:
        """The ids whose key changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed
