"""The router's checks of signed payments (common/signing.py): the sender's order on
`pay`, the receiver's acceptance on `receipt`, each against the participant's current key
(router/keyring.py). A payment that fails either check ends `bad_signature`; a check that
passes puts the signature into the row, where the ledger's hash chain covers it.

An Ed25519 verification costs about as much as the router spends on a whole payment
(~95 µs with libsodium here, ~130 µs with OpenSSL), so it does not run on the event loop,
nor on a thread of the router (that thread would share the loop's GIL): `check_order` and
`check_acceptance` queue the job for a verifier process (router/verifier.py, started by
`start`), and every job queued in one turn of the loop goes to it in one pipe write; its
answers (one byte a job, in order) come back on the loop. If the process dies, a new one
is started and every unanswered job is sent again. docs/PERFORMANCE.md has what it costs.

Rules:
- a check's callback runs on the event loop, once, with True or False;
- at most MAX_WAITING checks wait at once (`busy`): beyond, the caller refuses the
  request (`rate_limited`) instead of letting the queue grow;
- checks queued before `start` wait for it;
- a missing signature or key fails the check at once, without the verifier;
- a verifier that answers nothing for STALL_S while checks wait is killed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
import sys
from collections import deque
from collections.abc import Callable

from common.aio import watch
from common.logs import log_event
from common.messages import RowIn
from common.signing import PAY_TAG, RECEIPT_TAG, payment_bytes
from router.keyring import PayerKeys
from router.verifier import decode_job, encode_job, verify_raw

log = logging.getLogger("jackpay.router")

MAX_WAITING = 20_000
# A verifier that answers nothing for this long while checks wait (stopped, wedged) is
# killed; the restart sends it every unanswered check again. A full queue takes ~2 s.
STALL_S = 5.0
VERIFIER_ARGS = ("-m", "router.verifier")
Done = Callable[[bool], None]
_LEN = struct.Struct(">I")
# where `router` is importable from, for the verifier process
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PaymentSignatures:
    def __init__(self, network_id: str, keys: PayerKeys) -> None:
        self.network_id = network_id
        self.keys = keys
        self._pending: deque[tuple[bytes, Done]] = deque()  # sent or to send, in order
        self._unsent = 0  # how many at the end of `_pending` are not written yet
        self._flush_soon = False
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._inline = False  # the verifier keeps dying: check on the loop instead
        self._deaths: deque[float] = deque(maxlen=5)
        self.restarts = 0
        # Called if a reader ever ends by an exception (common.aio.watch): no signed
        # payment could be answered again.
        self.on_death: Callable[[str], None] | None = None
        self._progress_at = 0.0  # loop time of the last answer, or of a first job
        self._watchdog: asyncio.TimerHandle | None = None

    def _job(self, signer: str, tag: bytes, row: RowIn, sig: bytes | None
             ) -> tuple[bytes, bytes, bytes] | None:
        if sig is None:
            return None
        key = self.keys.raw(signer)
        if key is None:
            return None
        return key, sig, payment_bytes(tag, self.network_id, row.sender, row.tx_id,
                                       row.receiver, row.amount, row.memo)

    # --- checks (answered by the verifier process) -------------------------------------

    @property
    def busy(self) -> bool:
        return len(self._pending) >= MAX_WAITING

    @property
    def waiting(self) -> int:
        """Checks queued or sent, not answered yet."""
        return len(self._pending)

    @property
    def inline(self) -> bool:
        """True once the checks run on the event loop (the verifier kept ending)."""
        return self._inline

    def check_order(self, row: RowIn, sig: bytes | None, done: Done) -> None:
        self._submit(self._job(row.sender, PAY_TAG, row, sig), done)

    def check_acceptance(self, row: RowIn, sig: bytes | None, done: Done) -> None:
        self._submit(self._job(row.receiver, RECEIPT_TAG, row, sig), done)

    def _submit(self, job: tuple[bytes, bytes, bytes] | None, done: Done) -> None:
        if job is None:
            done(False)
            return
        if self._inline:
            done(verify_raw(*job))
            return
        if not self._pending:
            self._progress_at = asyncio.get_running_loop().time()
        self._pending.append((encode_job(*job), done))
        self._unsent += 1
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Every job queued since the last write, in one write."""
        self._flush_soon = False
        proc = self._proc
        if proc is None or proc.stdin is None or not self._unsent:
            return
        first = len(self._pending) - self._unsent
        payload = b"".join(job for job, _ in itertools.islice(self._pending, first, None))
        self._unsent = 0
        try:
            proc.stdin.write(_LEN.pack(len(payload)) + payload)
        except (ConnectionError, RuntimeError):
            pass  # it died: the reader sees it and starts another, which gets them all

    async def start(self) -> None:
        """Start the verifier process (and send it whatever is queued)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, *VERIFIER_ARGS, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        self._unsent = len(self._pending)  # a new process: every unanswered job again
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read(self._proc))
        if self.on_death is not None:
            watch(self._reader, "the signature verifier's reader", self.on_death)
        if self._watchdog is None:
            self._watchdog = loop.call_later(1.0, self._check_stall)
        self._progress_at = loop.time()
        self._flush()

    def _check_stall(self) -> None:
        """Once a second: checks waiting and no answer for STALL_S → kill the verifier
        (the reader starts another, which gets every unanswered check)."""
        loop = asyncio.get_running_loop()
        self._watchdog = None if self._stopping else loop.call_later(1.0, self._check_stall)
        proc = self._proc
        if (self._pending and not self._inline and proc is not None
                and proc.returncode is None and loop.time() - self._progress_at > STALL_S):
            log_event(log, "the signature verifier answered nothing; killing it",
                      logging.ERROR, waiting=len(self._pending), seconds=STALL_S)
            self._progress_at = loop.time()
            proc.kill()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            data = await proc.stdout.read(65536)
            if not data:
                break
            self._progress_at = asyncio.get_running_loop().time()
            for ok in data:
                _, done = self._pending.popleft()
                try:
                    done(ok == 1)
                except Exception:  # one payment's failure must not drop the others' answers
                    log.exception("a signature check's callback failed")
        if self._stopping:
            return
        code = await proc.wait()
        loop = asyncio.get_running_loop()
        self.restarts += 1
        log_event(log, "the signature verifier process ended; starting another",
                  logging.ERROR, exit=code)
        while not self._stopping:
            self._deaths.append(loop.time())
            if len(self._deaths) == self._deaths.maxlen and loop.time() - self._deaths[0] < 10:
                # It cannot run here (a broken install?): slower on the loop beats no
                # answers.
                log_event(log, "the signature verifier keeps ending or cannot start; "
                          "checking signatures on the event loop from now on", logging.ERROR)
                self._check_inline()
                return
            await asyncio.sleep(0.1)
            if self._stopping:
                return
            try:
                await self.start()
                return
            except OSError as exc:  # no process now (fds, memory): try again
                log_event(log, "cannot start the signature verifier; retrying",
                          logging.ERROR, error=str(exc))
                await asyncio.sleep(1.0)

    def _check_inline(self) -> None:
        """From now on every check runs on the event loop; those waiting first."""
        self._inline = True
        pending, self._pending = self._pending, deque()
        self._unsent = 0
        for job, done in pending:
            key, sig, data, _ = decode_job(job)
            try:
                done(verify_raw(key, sig, data))
            except Exception:  # one payment's failure must not drop the others' answers
                log.exception("a signature check's callback failed")

    async def aclose(self) -> None:
        """Stop the verifier process (the checks still waiting are dropped: the router is
        stopping)."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
