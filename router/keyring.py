"""The participants' public keys, as the router checks logins against them.

Rules:
- a participant's key is `<keys>/public/payers/<id>.pub` (common.keys); one without a
  usable key file (missing, not an Ed25519 key, a link, not a plain file, another
  user's, writable by others) cannot log in — it is logged, and never "keeps the old
  key" — but may still be paid;
- a key folder writable by group or others stops the router at start, and while it
  happens at run time nobody logs in (logged once);
- each key file is looked at again (one `stat`: inode, size, mtime, ctime) before that
  participant's every login, and all of them every second: `jackpay-keys --rotate alice`
  (or a file copied over in place) is in force from the next login without a restart,
  and `take_changed` names the participants whose key changed or went away (their live
  sessions were proven with a key that no longer counts: the router closes them).
"""

from __future__ import annotations

import logging
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.keys import KeyFileError, KeyStore, raw_public
from common.logs import log_event

log = logging.getLogger("jackpay.router.keys")

_Stamp = tuple[int, int, int, int] | None  # inode, size, mtime, ctime (None: no file)


class PayerKeys:
    def __init__(self, store: KeyStore, payer_ids: list[str]) -> None:
        self.store = store
        self.payer_ids = list(payer_ids)
        self._known = set(payer_ids)
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._raw: dict[str, bytes] = {}
        self._stamps: dict[str, _Stamp] = {}
        self._changed: set[str] = set()
        self._loaded = False
        self.unsafe: str | None = None  # why the key folders cannot be trusted now

    def get(self, payer_id: str) -> Ed25519PublicKey | None:
        """The participant's key; None when it has none, or while a key folder is
        writable by others (nobody logs in until that is fixed)."""
        return None if self.unsafe is not None else self._keys.get(payer_id)

    def raw(self, payer_id: str) -> bytes | None:
        """The 32 raw bytes of the participant's current key (None: no usable key)."""
        return None if self.unsafe is not None else self._raw.get(payer_id)

    def __len__(self) -> int:
        return len(self._keys)

    def _stamp(self, payer_id: str) -> _Stamp:
        try:
            st = os.stat(self.store.payer_public(payer_id))
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load_one(self, payer_id: str, stamp: _Stamp) -> str | None:
        """Read one key as of `stamp`; returns why it cannot be used, or None."""
        self._stamps[payer_id] = stamp
        old = self._raw.get(payer_id)
        self._keys.pop(payer_id, None)
        self._raw.pop(payer_id, None)
        problem = None
        try:
            key = self.store.load_payer_public(payer_id)  # a plain file, ours, not too open
        except KeyFileError as exc:
            problem = str(exc)
        else:
            self._keys[payer_id] = key
            self._raw[payer_id] = raw_public(key)
        if self._loaded and old is not None and self._raw.get(payer_id) != old:
            self._changed.add(payer_id)
        return problem

    def load(self) -> None:
        """Read every participant's key (at start)."""
        self._check_folder()
        missing = []
        for pid in self.payer_ids:
            problem = self._load_one(pid, self._stamp(pid))
            if problem is not None:
                missing.append(pid)
                if len(missing) <= 5:
                    log_event(log, "participant cannot log in", logging.WARNING, payer=pid,
                              reason=problem)
        if len(missing) > 5:
            log_event(log, "participants without a usable key", logging.WARNING,
                      count=len(missing), hint="run jackpay-keys CONFIG")
        self._loaded = True

    def _check_folder(self) -> None:
        """Raises KeyFileError if anyone but its owner may write the public keys' folders
        (they could then log in as anyone)."""
        unsafe = self.store.unsafe_public_folder()
        if unsafe is not None:
            raise KeyFileError(unsafe)

    def refresh(self, payer_id: str | None = None) -> None:
        """Re-read the keys (or `payer_id`'s) whose file changed since the last look; the
        ids whose key changed are kept for `take_changed`. An id that is not a
        participant is not looked up (it names no file)."""
        if payer_id is not None and payer_id not in self._known:
            return
        unsafe = self.store.unsafe_public_folder()
        if unsafe != self.unsafe:
            self.unsafe = unsafe
            if unsafe is not None:
                log_event(log, "no logins until the key folders are safe", logging.ERROR,
                          reason=unsafe)
            else:
                log_event(log, "key folders safe again")
        for pid in self.payer_ids if payer_id is None else [payer_id]:
            stamp = self._stamp(pid)
            if pid not in self._stamps or stamp != self._stamps[pid]:
                problem = self._load_one(pid, stamp)
                log_event(log, "participant key file changed", logging.WARNING
                          if problem else logging.INFO, payer=pid, problem=problem)

    def add(self, payer_id: str) -> str | None:
        """Check logins of `payer_id` too (a participant added at run time); returns why
        its key cannot be used yet, or None."""
        if payer_id in self._known:
            return None
        self.payer_ids.append(payer_id)
        self._known.add(payer_id)
        return self._load_one(payer_id, self._stamp(payer_id))

    def remove(self, payer_id: str) -> None:
        """No more logins of `payer_id` (no longer a participant)."""
        if payer_id not in self._known:
            return
        self._known.discard(payer_id)
        self.payer_ids.remove(payer_id)
        self._keys.pop(payer_id, None)
        self._raw.pop(payer_id, None)
        self._stamps.pop(payer_id, None)

    def take_changed(self) -> set[str]:
        """The ids whose key changed or went away since the last call."""
        changed, self._changed = self._changed, set()
        return changed
