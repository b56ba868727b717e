"""The router's checks of signed payments (common/signing.py): the sender's order on
`pay`, the receiver's acceptance on `receipt`, each against the participant's current key
(router/keyring.py). A payment that fails either check ends `bad_signature`; a check that
passes puts the signature into the row, where the ledger's hash chain covers it.

An Ed25519 verification costs about as much as the router spends on a whole payment
(~95 µs with libsodium here, ~130 µs with OpenSSL), so it does not run on the event loop:
`check` hands it to a verifier thread (libsodium through PyNaCl releases the GIL while it
works, so the other core does it) and calls back on the loop. Under load the thread takes
every job waiting and answers them with one wake-up of the loop, so the loop's share is
a few microseconds a check. docs/PERFORMANCE.md has what it costs.

Rules:
- a check's callback runs on the event loop, once, with True or False;
- at most MAX_WAITING checks wait at once (`busy`): beyond, the caller refuses the
  request (`rate_limited`) instead of letting the queue grow;
- a missing signature or key fails the check at once, without the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

import nacl.bindings
import nacl.exceptions

from common.messages import RowIn
from common.signing import PAY_TAG, RECEIPT_TAG, payment_bytes
from router.keyring import PayerKeys

log = logging.getLogger("jackpay.router")

MAX_WAITING = 20_000
Done = Callable[[bool], None]


def verify_raw(public_key: bytes, sig: bytes, data: bytes) -> bool:
    """Ed25519 (libsodium): whether `sig` is `public_key`'s signature of `data`."""
    try:
        nacl.bindings.crypto_sign_open(sig + data, public_key)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


class PaymentSignatures:
    def __init__(self, network_id: str, keys: PayerKeys) -> None:
        self.network_id = network_id
        self.keys = keys
        self._jobs: deque[tuple[bytes, bytes, bytes, Done]] = deque()
        self._wake = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.checked = 0
        self.refused = 0

    # --- synchronous (tests, tools) ------------------------------------------------

    def _job(self, signer: str, tag: bytes, row: RowIn, sig: bytes | None
             ) -> tuple[bytes, bytes, bytes] | None:
        if sig is None:
            return None
        key = self.keys.raw(signer)
        if key is None:
            return None
        return key, sig, payment_bytes(tag, self.network_id, row.sender, row.tx_id,
                                       row.receiver, row.amount, row.memo)

    def ordered(self, row: RowIn, sig: bytes | None) -> bool:
        """Whether `sig` is the row's sender's order of exactly this row (blocking)."""
        job = self._job(row.sender, PAY_TAG, row, sig)
        return job is not None and verify_raw(*job)

    def accepted(self, row: RowIn, sig: bytes | None) -> bool:
        """Whether `sig` is the row's receiver's acceptance of exactly this row (blocking)."""
        job = self._job(row.receiver, RECEIPT_TAG, row, sig)
        return job is not None and verify_raw(*job)

    # --- off the event loop -----------------------------------------------------------

    @property
    def busy(self) -> bool:
        return len(self._jobs) >= MAX_WAITING

    def check_order(self, row: RowIn, sig: bytes | None, done: Done) -> None:
        self._submit(self._job(row.sender, PAY_TAG, row, sig), done)

    def check_acceptance(self, row: RowIn, sig: bytes | None, done: Done) -> None:
        self._submit(self._job(row.receiver, RECEIPT_TAG, row, sig), done)

    def _submit(self, job: tuple[bytes, bytes, bytes] | None, done: Done) -> None:
        if job is None:
            self.refused += 1
            done(False)
            return
        if self._thread is None:
            self._start()
        self._jobs.append((*job, done))
        if len(self._jobs) == 1:
            with self._wake:
                self._wake.notify()

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="signature-checks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (the checks still waiting are dropped: the router is stopping)."""
        self._stopping = True
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        jobs = self._jobs
        while not self._stopping:
            if not jobs:
                with self._wake:
                    if not jobs and not self._stopping:
                        self._wake.wait(timeout=1.0)
                continue
            results: list[tuple[Done, bool]] = []
            while jobs and len(results) < 512:
                key, sig, data, done = jobs.popleft()
                results.append((done, verify_raw(key, sig, data)))
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._deliver, results)
            except RuntimeError:  # the loop is closed: the router has stopped
                return

    def _deliver(self, results: list[tuple[Done, bool]]) -> None:
        for done, ok in results:
            self.checked += 1
            if not ok:
                self.refused += 1
            try:
                done(ok)
            except Exception:  # one payment's failure must not drop the others' answers
                log.exception("a signature check's callback failed")
