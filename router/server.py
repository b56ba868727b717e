"""The router service: startup, payer sessions, request handlers, shutdown.

Lifecycle (each step logged):
1. connect to the ledger (retrying with backoff until it answers);
2. replay every ledger row (paged `read`) to rebuild balances and the tx_id index;
3. issue missing opening balances (`_issuer -> id`, tx_id `_open:<id>`);
4. listen; the caller prints the readiness line;
5. on shutdown: stop accepting, refuse new payments (`shutting_down`), let in-flight
   ones finish within `shutdown_grace_s`, cancel the rest, close sessions and the ledger.

Sessions: every connection is TLS 1.3 with the router's certificate. Its first frames
must be the login (router/login.py): `hello` (role `payer`, our protocol version, a
nonce), answered `challenge`, then `auth` signed with the participant's key; anything
else, or a refused login, is answered with an error and the connection is closed. TLS,
hello and auth must be done within `handshake_timeout_s` of connecting, and frames before
login are at most PRE_LOGIN_MAX_FRAME_BYTES. The proven identity is the sender of every
payment on the session. Bad frames after that get `bad_request` from the Channel and the
session goes on. A peer's bad input is logged as one line, never a traceback.

Bounds: connections in total and per source address (refused before any TLS work), one
request budget per payer (`payer_requests_per_s`) and `payer_max_in_flight` payments at
once: above either, `rate_limited`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import PROTOCOL_VERSION
from common.aio import Channel, accept_hello, claim_unix_path, start_channel_server, watch
from common.config import NetworkConfig, server_limits
from common.errors import ConfigError, ConnectionLost, ErrorCode, InvariantViolation, JackPayError
from common.keys import ISSUER_SIGNER, POOL_SIGNER, KeyStore
from common.limits import FailedLogins
from common.logs import ThrottledEvents, log_event
from common.messages import (
    ROUTER_REQUESTS,
    Ack,
    Auth,
    BalanceReply,
    Error,
    GetBalance,
    Hello,
    History,
    HistoryReply,
    LedgerRow,
    Message,
    Paid,
    Pay,
    Ping,
    Pong,
    Receipt,
    ReconcileReply,
    Reject,
    RowIn,
    Status,
    StatusReply,
    TxState,
    Welcome,
    decoder_for,
    encode,
)
from common.metrics import serve_metrics
from common.money import format_amount
from common.participants import Participant
from common.signing import PAY_TAG, read_openings, sign, verify
from common.tls import ClientTls, client_tls, server_context
from router.admin import AdminServer
from router.book import Book, Opening
from router.keyring import PayerKeys
from router.ledger_client import LedgerClient, LedgerRefused, LedgerUnavailable, durable_row
from router.login import Login, LoginPolicy, LoginRefused
from router.metrics import router_metrics
from router.participants import OperatorRefused, ParticipantOps
from router.payments import Outcome, Pipeline, StepTimes
from router.plugins import (
    BalanceSnapshot,
    PluginContext,
    PluginFailed,
    StartInfo,
    load_plugins,
)
from router.reconcile import Replay, settled_when_read
from router.sessions import Registry, Session
from router.signatures import PaymentSignatures
from router.transactions import TxState as RecordState

log = logging.getLogger("jackpay.router")

_DECODER = decoder_for(ROUTER_REQUESTS)
SERVER_NAME = "jackpay-router"
REPLAY_PAGE_ROWS = 1000  # the ledger sends fewer when they would not fit one frame
BALANCE_PAGE = 1000  # accounts per `balances` page (the ledger sends fewer to fit a frame)
HISTORY_MAX_ROWS = 100
# A hello or an auth is under 200 bytes: nothing larger is read before login.
PRE_LOGIN_MAX_FRAME_BYTES = 1024
KEY_CHECK_S = 1.0  # how often the participants' key files are looked at (rotation)
# Tokens a request takes from the payer's budget (others: 1). A history page reads the
# ledger: about a hundred times a ping's work at the router and the ledger together.
REQUEST_COST: dict[type[Message], int] = {History: 20}
BAD_FRAME_COST = 20
_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class RouterSecurity:
    """The router's side of the security scheme. All None: plain TCP and no login, for
    the benchmark's comparison run only — never a supported network."""

    tls: ssl.SSLContext | None  # the payer port's server context
    ledger_tls: ClientTls | None  # to the ledger, with the router's client certificate
    login: LoginPolicy | None  # what logins are checked against (the participants' keys)
    # Signs the debits of system accounts (the mixer's payouts): common/keys.POOL_SIGNER.
    pool_signer: Ed25519PrivateKey | None = None
    issuer: Ed25519PublicKey | None = None  # checks the signed openings it presents

    @classmethod
    def from_config(cls, cfg: NetworkConfig, *, plain: bool = False) -> RouterSecurity:
        """Raises ConfigError (KeyFileError) for a missing or unsafe key."""
        if plain:
            return cls(None, None, None)
        store = KeyStore.for_config(cfg)
        return cls(server_context(store, "router"),
                   client_tls(store, "ledger", identity="router-client"),
                   LoginPolicy(cfg.network.id, store.server_name("router"),
                               PayerKeys(store, [p.id for p in cfg.participants]),
                               FailedLogins(cfg.router.failed_logins_per_minute)),
                   store.load_signer(POOL_SIGNER), store.load_signer_public(ISSUER_SIGNER))


def connection_budget(wanted: int) -> int:
    """`wanted` connections, or fewer if this process may not open that many files (a
    cap we cannot honour would turn into failed accepts for everyone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and soft < wanted + 64:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft - 64 < wanted:
        return max(1, soft - 64)
    return wanted


class StartupFailed(JackPayError):
    """The router cannot start; the message says why and what to do."""


class RouterService:
    def __init__(self, cfg: NetworkConfig, security: RouterSecurity, *, host: str, port: int,
                 ledger_host: str, ledger_port: int, admin_path: Path | None = None,
                 plugin_factories: dict[str, Any] | None = None,
                 config_path: Path | None = None, check_signatures: bool = True) -> None:
        """Raises StartupFailed for a plug-in that cannot be loaded or a participants file
        that cannot be read. `config_path`: the file `reload` reads again.
        `check_signatures` False: payments are not checked for their signatures — the
        benchmark's `unsigned` comparison only, never a network."""
        self.cfg = cfg
        self.keys = KeyStore.for_config(cfg)
        self.security = security
        self.host = host
        self.port = port
        rc = cfg.router
        self.ledger = LedgerClient(ledger_host, ledger_port, tls=security.ledger_tls,
                                   timeout_s=rc.ledger_timeout_s,
                                   retry_max_s=rc.ledger_retry_max_s,
                                   max_frame_bytes=cfg.ledger.max_frame_bytes)
        self.book = Book()
        self.registry = Registry(cfg.participants, rc.payer_requests_per_s)
        try:
            self.plugins = load_plugins(
                rc.plugins, cfg.plugins,
                PluginContext(cfg.network.id, cfg.resolve(rc.plugin_state_dir),
                              self.registry.receiver_exists),
                factories=plugin_factories)
        except ConfigError as exc:
            raise StartupFailed(str(exc)) from None
        signatures = (PaymentSignatures(cfg.network.id, security.login.keys)
                      if security.login is not None and check_signatures else None)
        pool = security.pool_signer
        net_id = cfg.network.id

        def sign_system(row: RowIn) -> bytes | None:
            if pool is None or signatures is None:
                return None
            return sign(pool, PAY_TAG, net_id, row.sender, row.tx_id, row.receiver, row.amount,
                        row.memo)

        self.pipeline = Pipeline(self.book, self.registry, self.ledger, rc, self.plugins,
                                 signatures, sign_system)
        if self.plugins.wants_flush:
            self.ledger.before_send = self.plugins.flush
        self._plugin_rows: list[LedgerRow] | None = [] if self.plugins.enabled else None
        self._plugin_timer: asyncio.TimerHandle | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self.last_reconcile: int | None = None  # differences found by the periodic check
        self.metrics_at: str | None = None  # HOST:PORT of the metrics server, once up
        self.died = asyncio.Event()  # a task the router cannot work without ended
        self.death: str | None = None  # why
        self._metrics_server: Any = None
        self.login_policy = security.login
        self.refused_logins = 0
        self.refusals = ThrottledEvents(log)  # refused hellos and logins: a peer's doing
        self._server: asyncio.Server | None = None
        self._connections: set[Channel] = set()
        self._key_watch: asyncio.TimerHandle | None = None
        self._openings_in_flight: set[tuple[str, str]] = set()  # appended, unanswered
        self.addr: tuple[str, int] = (host, port)
        self.admin = AdminServer(self, admin_path or cfg.resolve(rc.admin_socket))
        try:
            self.participant_ops = ParticipantOps(self, config_path)
        except ConfigError as exc:
            raise StartupFailed(str(exc)) from None

    # --- startup ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, replay, issue openings, listen. Raises StartupFailed."""
        try:
            # Before the ledger hears from us: a second router for the same network would
            # fence the live one's ledger session at hello.
            await claim_unix_path(self.admin.path, "another router")
        except ConfigError as exc:
            raise StartupFailed(str(exc)) from None
        if self.pipeline.signatures is not None:
            self.pipeline.signatures.on_death = self._died
            await self.pipeline.signatures.start()  # router/verifier.py, its own process
        self.ledger.start(on_death=self._died)
        log_event(log, "waiting for the ledger", ledger=self.ledger.address)
        await self.ledger.wait_connected()
        await self.load_book()
        await self.issue_openings()
        self._start_plugins()
        keys = self.login_policy.keys if self.login_policy is not None else None
        if keys is not None:
            try:
                keys.load()
            except ConfigError as exc:
                raise StartupFailed(str(exc)) from None
            self._key_watch = asyncio.get_running_loop().call_later(KEY_CHECK_S,
                                                                    self._check_keys)
        rc = self.cfg.router
        max_connections = connection_budget(rc.max_connections)
        if max_connections < rc.max_connections:
            log_event(log, "max_connections lowered to the open-file limit", logging.WARNING,
                      configured=rc.max_connections, allowed=max_connections)
        try:
            self._server = await start_channel_server(
                self._on_connect, _DECODER, self.host, self.port, name="payer",
                max_frame_bytes=rc.max_frame_bytes, tls=self.security.tls,
                handshake_timeout_s=rc.handshake_timeout_s,
                limits=dataclasses.replace(server_limits(rc), max_connections=max_connections))
        except OSError as exc:
            raise StartupFailed(f"cannot listen for payers on {self.host}:{self.port} "
                                f"([router] host and port): {exc.strerror or exc}") from None
        sock = self._server.sockets[0].getsockname()
        self.addr = (sock[0], sock[1])
        try:
            await self.admin.start()
        except (OSError, ConfigError) as exc:  # payments do not need it; say so, go on
            log_event(log, "admin socket unavailable", logging.ERROR, path=str(self.admin.path),
                      error=str(exc))
        if rc.metrics_addr:
            self.pipeline.times = StepTimes()
            try:
                host, port, self._metrics_server = serve_metrics(
                    rc.metrics_addr, lambda: router_metrics(self))
            except (OSError, ConfigError) as exc:
                raise StartupFailed(f"metrics at {rc.metrics_addr}: {exc}") from None
            self.metrics_at = f"{host}:{port}"
        if rc.reconcile_every_s:
            self._reconciler = asyncio.get_running_loop().create_task(
                self._reconcile_now_and_then(rc.reconcile_every_s), name="reconcile")
            # A check, not a function payments need: its end is logged, the router serves on.
            watch(self._reconciler, "the periodic reconcile", lambda _reason: None)
        log_event(log, "listening", addr=f"{self.addr[0]}:{self.addr[1]}",
                  admin=str(self.admin.path), participants=len(self.registry.participants),
                  tls=self.security.tls is not None,
                  keys=len(keys) if keys is not None else None)

    def _died(self, reason: str) -> None:
        """A task the router cannot work without ended (common.aio.watch): `serve`
        shuts down and exits 3, for the supervisor to restart it."""
        if self.death is None:
            self.death = reason
        self.died.set()

    async def load_book(self) -> None:
        """Start the book from the ledger without replaying every row: its balances after
        its last row (paged, all at one head), then the most recent `[router]
        recent_rows` rows (retries and `status` of recent payments answered from
        memory), then the rows of the plug-ins' accounts. Retries while the ledger is
        away. Raises StartupFailed if the ledger's balances cannot be right."""
        balances: list[tuple[str, int]] = []
        while True:
            try:
                head = await self._read_balances(balances)
                break
            except LedgerUnavailable as exc:
                balances.clear()
                log_event(log, "loading the balances; retrying", logging.WARNING,
                          error=str(exc))
                await asyncio.sleep(0.1)
                await self.ledger.wait_connected()
        try:
            self.book.start_from(balances, head)
        except InvariantViolation as exc:
            raise StartupFailed(f"the ledger's balances cannot be right: {exc}; run "
                                "`jackpay-ledger verify` on it") from exc
        recent = self.cfg.router.recent_rows
        rows = await self._read_rows(max(1, head - recent + 1), head) if recent else []
        for row in rows:
            self.book.remember(row)
        if self._plugin_rows is not None:
            try:
                first = self.plugins.rows_from()
            except PluginFailed as exc:
                raise StartupFailed(f"{exc}; see the router's log") from exc
            for account in sorted(self.plugins.system_accounts):
                self._plugin_rows.extend(await self._read_rows(first, head, party=account))
            self._plugin_rows.sort(key=lambda r: r.seq)
            self._plugin_rows = list({r.seq: r for r in self._plugin_rows}.values())
        log_event(log, "book loaded", last_seq=head, accounts=len(balances),
                  recent_rows=len(rows), total=self.book.accounts.total())

    async def _read_balances(self, out: list[tuple[str, int]]) -> int:
        """Every balance, page by page, into `out`; returns the head they are after.
        Raises LedgerUnavailable (also if the head moved between pages: nothing else
        writes while the router starts, so the ledger is not the one we think)."""
        page = await self.ledger.balances("", BALANCE_PAGE)
        head = page.last_seq, page.last_hash
        out.extend(page.balances)
        while page.more:
            page = await self.ledger.balances(page.balances[-1][0], BALANCE_PAGE)
            if (page.last_seq, page.last_hash) != head:
                raise LedgerUnavailable("the ledger's head moved while its balances were read")
            out.extend(page.balances)
        return head[0]

    async def _read_rows(self, from_seq: int, to_seq: int, *,
                         party: str | None = None) -> list[LedgerRow]:
        """Rows from_seq..to_seq (of `party`), paged, retrying while the ledger is away."""
        rows: list[LedgerRow] = []
        while from_seq <= to_seq:
            try:
                page = await self.ledger.read(from_seq, REPLAY_PAGE_ROWS, party=party)
            except LedgerUnavailable as exc:
                log_event(log, "reading the ledger; retrying", logging.WARNING, error=str(exc))
                await asyncio.sleep(0.1)
                await self.ledger.wait_connected()
                continue
            rows.extend(r for r in page.rows if r.seq <= to_seq)
            if not page.rows or not (page.more if party else page.next_seq <= page.last_seq):
                break
            from_seq = page.next_seq
        return rows

    async def issue_openings(self, participants: list[Participant] | None = None) -> None:
        """Append the opening balances (of the config's participants, or of
        `participants`) not yet in the ledger (deterministic tx_ids); retries until the
        ledger has them all. Raises StartupFailed if the ledger refuses one or holds its
        tx_id for another payment."""
        chosen = self.cfg.participants if participants is None else participants
        openings = [Opening(p.id, p.opening_minor) for p in chosen]
        while True:
            rows = self.book.missing_openings(openings)
            if rows and self.book.base_seq:
                # Issued before this start (older than the recent rows): the ledger's
                # row wins over a changed config, and nothing is sent again.
                try:
                    await self.pipeline.recall([(r.sender, r.tx_id) for r in rows])
                except LedgerUnavailable as exc:
                    log_event(log, "opening balances not looked up yet; retrying",
                              logging.WARNING, error=str(exc))
                    await asyncio.sleep(0.1)
                    await self.ledger.wait_connected()
                    continue
                rows = self.book.missing_openings(openings)
            if not rows:
                return
            rows = self._signed_openings(rows)
            keys = {(r.sender, r.tx_id) for r in rows}
            self._openings_in_flight |= keys  # written perhaps, not applied yet: reconcile
            try:
                futs = [self.ledger.append(r) for r in rows]
                results = await asyncio.gather(*futs, return_exceptions=True)
            finally:
                self._openings_in_flight -= keys
            for row_in, res in zip(rows, results, strict=True):
                if isinstance(res, LedgerUnavailable):
                    log_event(log, "opening balance not issued yet; retrying", logging.WARNING,
                              tx_id=row_in.tx_id)
                    continue
                if isinstance(res, LedgerRefused):
                    raise StartupFailed(f"the ledger refused opening balance {row_in.tx_id}: "
                                        f"{res}")
                if isinstance(res, BaseException):
                    raise res
                if res.status == "conflict":
                    raise StartupFailed(f"ledger holds {row_in.tx_id} for another payment")
                self.book.record_issued(durable_row(row_in, res))
                if res.status == "written":
                    log_event(log, "opening balance issued", tx_id=row_in.tx_id,
                              receiver=row_in.receiver, amount=format_amount(row_in.amount),
                              seq=res.seq)
            if self.book.missing_openings(openings):
                await asyncio.sleep(0.1)
                await self.ledger.wait_connected()

    def opening_signatures(self, rows: list[RowIn]) -> list[bytes | None]:
        """The issuer's signature of each opening row, from `keys/public/openings.json`
        (`jackpay-keys` signs them where the issuer's key is): None where it is missing
        or not good (or on the benchmark's plain run, which has no keys)."""
        issuer = self.security.issuer
        if issuer is None:
            return [None] * len(rows)
        try:
            signed = read_openings(self.keys.openings)
        except (ValueError, OSError) as exc:
            log_event(log, "signed openings unreadable", logging.ERROR, error=str(exc))
            signed = {}
        out: list[bytes | None] = []
        for row in rows:
            amount, sig = signed.get(row.receiver, (None, b""))
            good = amount == row.amount and verify(issuer, sig, PAY_TAG, self.cfg.network.id,
                                                   row.sender, row.tx_id, row.receiver,
                                                   row.amount, row.memo)
            out.append(sig if good else None)
        return out

    def _signed_openings(self, rows: list[RowIn]) -> list[RowIn]:
        """The openings with the issuer's signatures. The router never mints: an opening
        the issuer has not signed is not issued (StartupFailed names it), except on the
        benchmark's plain run, which has no keys."""
        if self.security.issuer is None:
            return rows
        out = []
        for row, sig in zip(rows, self.opening_signatures(rows), strict=True):
            if sig is None:
                raise StartupFailed(
                    f"the opening balance of {row.receiver} ({format_amount(row.amount)}) is "
                    f"not signed by the issuer's key: run `jackpay-keys CONFIG` where "
                    f"keys/private/issuer.key is (it signs {self.keys.openings.name}), then "
                    "start again; the router never mints without it")
            out.append(msgspec.structs.replace(row, sender_sig=sig))
        return out

    async def reconcile(self) -> ReconcileReply:
        """The live book against a replay of the ledger (router/reconcile.py). Reads
        every row (paged), folding those the router has settled for good as they come
        (memory: the accounts, not the rows), then judges in one synchronous step; if
        payments committed rows beyond what was read in the meantime, reads on (a few
        times). Raises LedgerUnavailable; RuntimeError if the ledger kept growing faster
        than it read."""
        book, pipeline = self.book, self.pipeline
        replay = Replay(book.base_seq)
        next_seq, last_read = 1, 0
        for _ in range(20):
            while True:
                page = await self.ledger.read(next_seq, REPLAY_PAGE_ROWS)
                in_flight, settled_to = self._rows_in_flight(), book.last_seq
                for r in page.rows:
                    replay.add(r, settled=settled_when_read(
                        r, base_seq=book.base_seq, settled_to=settled_to,
                        in_flight=in_flight, known_seq=self._known_seq))
                if page.rows:
                    last_read = page.rows[-1].seq
                next_seq = page.next_seq
                if not page.rows or page.next_seq > page.last_seq:
                    break
            if book.last_seq <= last_read:  # no await from here to the verdict
                debits: dict[str, int] = {}
                for p in pipeline.inflight.values():
                    if p.held:
                        for account, amount in p.debits:
                            debits[account] = debits.get(account, 0) + amount
                diffs, read, skipped = replay.verdict(
                    router_last_seq=book.last_seq, balances=book.accounts.snapshot(),
                    holds=book.accounts.holds(), in_flight_debits=debits,
                    in_flight=self._rows_in_flight(), known_seq=self._known_seq)
                return ReconcileReply(re=0, ok=not diffs, rows=read,
                                      router_last_seq=book.last_seq, differences=diffs,
                                      in_flight_skipped=skipped)
        raise RuntimeError("the ledger grew faster than the check could read it")

    def _rows_in_flight(self) -> set[tuple[str, str]]:
        """(sender, tx_id) of every row whose append is unanswered: each leg of the
        payments in flight (a fee's `_leg2:` row too), and the openings being issued."""
        keys = {(leg.sender, leg.tx_id) for p in self.pipeline.inflight.values()
                for leg in p.legs}
        return keys | self._openings_in_flight

    def _known_seq(self, sender: str, tx_id: str) -> int | None:
        rec = self.book.txs.get(sender, tx_id)
        return rec.seq if rec is not None else None

    async def _reconcile_now_and_then(self, every_s: float) -> None:
        """The periodic check ([router] reconcile_every_s): logged, never fatal."""
        while True:
            await asyncio.sleep(every_s)
            try:
                reply = await self.reconcile()
            except (LedgerUnavailable, RuntimeError) as exc:
                log_event(log, "reconcile skipped", logging.WARNING, error=str(exc))
                continue
            self.last_reconcile = len(reply.differences)
            if reply.ok:
                log_event(log, "reconcile ok", rows=reply.rows)
                continue
            for d in reply.differences:
                log_event(log, "reconcile difference", logging.ERROR, what=d.what,
                          account=d.account, router=format_amount(d.router),
                          ledger=format_amount(d.ledger), detail=d.detail or None)

    def _start_plugins(self) -> None:
        """The plug-ins' `start` (the rows of their system accounts, the balances), then
        their timer. Raises StartupFailed if a plug-in cannot rebuild its state."""
        if not self.plugins.enabled:
            return
        rows, self._plugin_rows = self._plugin_rows or [], None
        try:
            self.plugins.start(StartInfo(rows, BalanceSnapshot(self.book.accounts.snapshot()),
                                         time.time()))
        except PluginFailed as exc:
            raise StartupFailed(f"{exc}; see the router's log") from exc
        log_event(log, "plug-ins started", plugins=",".join(self.plugins.names))
        self._plugin_timer = asyncio.get_running_loop().call_later(
            self.cfg.router.plugin_tick_s, self._tick_plugins)

    def _tick_plugins(self) -> None:
        self._plugin_timer = asyncio.get_running_loop().call_later(
            self.cfg.router.plugin_tick_s, self._tick_plugins)
        self.pipeline.tick()

    # --- connections -----------------------------------------------------------------

    def _on_connect(self, ch: Channel) -> None:
        conn = PayerConnection(self)
        ch.on_message = conn.on_message
        ch.on_close = conn.on_close
        ch.max_frame_bytes = PRE_LOGIN_MAX_FRAME_BYTES
        self._connections.add(ch)
        ch.start()

    def _check_keys(self) -> None:
        """Rotation: a participant whose key changed loses its session (proven with the
        old key); its daemon logs in again with the new one."""
        assert self.login_policy is not None
        keys = self.login_policy.keys
        self._key_watch = asyncio.get_running_loop().call_later(KEY_CHECK_S, self._check_keys)
        keys.refresh()
        for payer_id in keys.take_changed():
            session = self.registry.session(payer_id)
            # A session proven with the current key (a login right after the rotation)
            # stays; one proven with a key that no longer counts goes.
            if session is not None and session.key != keys.raw(payer_id):
                log_event(log, "key changed; session closed", payer=payer_id)
                session.channel.reply_error(None, ErrorCode.AUTH_FAILED,
                                            "your key was replaced; log in again")
                session.channel.close()

    def forget_connection(self, ch: Channel) -> None:
        self._connections.discard(ch)

    # --- shutdown --------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, drain payments within the grace period, close everything."""
        grace = self.cfg.router.shutdown_grace_s
        log_event(log, "shutting down", inflight=len(self.pipeline.inflight), grace_s=grace)
        self._stop_accepting()
        cancelled = await self.pipeline.drain(grace)
        for ch in list(self._connections):
            ch.close()
        await self._close_links()
        log_event(log, "stopped", cancelled=cancelled, **self.pipeline.counts,
                  ledger=dataclasses.asdict(self.ledger.stats))

    async def aclose(self) -> None:
        """Close without draining (startup was interrupted)."""
        self._stop_accepting()
        await self._close_links()

    def _stop_accepting(self) -> None:
        """Timers and background checks stop; no new connections."""
        for timer in (self._key_watch, self._plugin_timer):
            if timer is not None:
                timer.cancel()
        if self._reconciler is not None:
            self._reconciler.cancel()
        if self._server is not None:
            self._server.close()

    def reload_soon(self) -> None:
        """SIGHUP: reload the config's participants (logged; a bad file changes nothing)."""
        async def reload() -> None:
            try:
                await self.participant_ops.reload()
            except OperatorRefused as exc:
                log_event(log, "reload refused", logging.ERROR, error=str(exc))
            except Exception:  # a bug: logged once, the router serves on
                log.exception("reload failed")

        self.admin.spawn(reload())

    async def _close_links(self) -> None:
        if self.pipeline.signatures is not None:
            await self.pipeline.signatures.aclose()
        await self.participant_ops.aclose()
        await self.admin.aclose()
        await self.ledger.aclose()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


class PayerConnection:
    """One TCP connection from a payer: the login (hello, challenge, auth), then its
    requests, each paid for from the payer's request budget."""

    def __init__(self, service: RouterService) -> None:
        self.service = service
        self.session: Session | None = None
        self.login: Login | None = None  # set after a hello that was answered `challenge`

    def on_close(self, ch: Channel) -> None:
        self.service.forget_connection(ch)
        if self.session is not None and self.service.registry.detach(self.session):
            log_event(log, "payer disconnected", payer=self.session.payer_id)

    def on_message(self, ch: Channel, msg: Message) -> Coroutine[Any, Any, None] | None:
        session = self.session
        if session is None:
            self._handshake(ch, msg)
            return None
        # Every frame that reaches us after login is paid for from the payer's budget
        # (a `history` costs more: it reads the ledger); answers to our own requests
        # never get here (the Channel matches them).
        registry = self.service.registry
        now = _monotonic()
        if not registry.budget(session.payer_id, now).take(now, REQUEST_COST.get(type(msg), 1)):
            rid = getattr(msg, "id", None)
            if rid is not None:
                ch.reply_error(rid, ErrorCode.RATE_LIMITED,
                               f"more than {registry.requests_per_s:g} requests a second; "
                               "slow down and retry", tx_id=getattr(msg, "tx_id", None))
            return None
        match msg:
            case Receipt() | Reject() | Ack() | Pong():
                # Late replies (their request already timed out): nothing to do.
                log.debug("unexpected %s from %s ignored", type(msg).__name__, session.payer_id)
            case Error(code=code, message=text):
                log_event(log, "payer sent an error", payer=session.payer_id, code=code[:64],
                          reason=text[:200])
            case Pay():
                self._pay(session, ch, msg)
            case Ping(id=rid):
                ch.send_nowait(Pong(re=rid))
            case GetBalance(id=rid):
                accounts = self.service.book.accounts
                pid = session.payer_id
                ch.send_nowait(BalanceReply(re=rid, balance=accounts.balance(pid),
                                            available=accounts.available(pid),
                                            last_tx_time=accounts.last_tx_time(pid)))
            case History():
                return self._history(session, ch, msg)
            case Status():
                book = self.service.book
                if book.base_seq and book.txs.get(msg.sender or session.payer_id,
                                                  msg.tx_id) is None:
                    return self._status_from_ledger(session, ch, msg)
                ch.send_nowait(self._status(session, msg))
            case Hello(id=rid) | Auth(id=rid):
                ch.reply_error(rid, ErrorCode.BAD_REQUEST, "this session already logged in")
        return None

    # --- login -------------------------------------------------------------------------

    def _handshake(self, ch: Channel, msg: Message) -> None:
        """Before login only `hello` and then `auth` are accepted; anything else, or a
        refused login, closes the connection."""
        service = self.service
        if self.login is None:
            hello = accept_hello(ch, msg, ("payer",), "this router")
            if hello is None:
                service.refusals.event("hello", "hello refused; closing", peer=ch.peername,
                                       t=type(msg).__name__)
                return
            policy = service.login_policy
            if policy is None:  # the plain benchmark: no authentication
                self._open_session(ch, hello.id, hello.peer)
                return
            self.login = Login(policy, ch.address_key)  # IPv6: failures counted per /64
            try:
                ch.send_nowait(self.login.on_hello(hello, _monotonic()))
            except LoginRefused as refused:
                self._refuse(ch, hello.id, refused)
            return
        try:
            proven = self.login.on_auth(msg, _monotonic())
        except LoginRefused as refused:
            self._refuse(ch, getattr(msg, "id", None), refused)
            return
        self._open_session(ch, proven.rid, proven.payer_id, proven.key)

    def _refuse(self, ch: Channel, rid: int | None, refused: LoginRefused) -> None:
        claimed = self.login.claimed if self.login is not None else None
        # One line a second per reason: a blocked address's every hello, a flood of bad
        # signatures, are counted (held_back) rather than each written.
        self.service.refusals.event(refused.kind, "login refused", logging.WARNING,
                                    peer=ch.peername, payer=claimed, code=refused.code.value,
                                    reason=refused.reason)
        self.service.refused_logins += 1
        ch.reply_error(rid, refused.code, refused.message)
        ch.close()

    def _open_session(self, ch: Channel, rid: int, payer_id: str,
                      key: bytes | None = None) -> None:
        registry = self.service.registry
        if not registry.receiver_exists(payer_id):  # only without authentication
            log_event(log, "hello from unknown payer refused", peer=ch.peername, payer=payer_id)
            ch.reply_error(rid, ErrorCode.AUTH_FAILED, "authentication failed")
            ch.close()
            return
        if payer_id in registry.suspended:
            log_event(log, "login of a suspended participant refused", peer=ch.peername,
                      payer=payer_id)
            ch.reply_error(rid, ErrorCode.PARTICIPANT_SUSPENDED,
                           "your account is suspended by the network's operator")
            ch.close()
            return
        session, old = registry.attach(payer_id, ch, key)
        self.session = session
        ch.handshake_complete()
        # From now on every frame is charged to the payer: unmatched replies and bad
        # frames too.
        ch.deliver_unmatched = True
        ch.on_bad_frame = self._charge_bad_frame
        ch.max_frame_bytes = self.service.cfg.router.max_frame_bytes
        ch.name = f"payer:{payer_id}"
        if old is not None:
            log_event(log, "session replaced", payer=payer_id)
            old.channel.reply_error(None, ErrorCode.SESSION_REPLACED,
                                    "a newer session for this payer took over")
            old.channel.close()
        accounts = self.service.book.accounts
        ch.send_nowait(Welcome(re=rid, version=PROTOCOL_VERSION, server=SERVER_NAME,
                               balance=accounts.balance(payer_id),
                               available=accounts.available(payer_id),
                               last_tx_time=accounts.last_tx_time(payer_id)))
        log_event(log, "payer connected", payer=payer_id, peer=ch.peername)

    def _charge_bad_frame(self, ch: Channel) -> None:
        """A bad frame after login costs BAD_FRAME_COST tokens; with the budget spent,
        the connection is closed."""
        session = self.session
        if session is None:
            return
        now = _monotonic()
        if not self.service.registry.budget(session.payer_id, now).take(now, BAD_FRAME_COST):
            log_event(log, "payer closed: bad frames beyond its budget", logging.WARNING,
                      payer=session.payer_id, peer=ch.peername)
            ch.reply_error(None, ErrorCode.RATE_LIMITED, "too many bad frames; closing")
            ch.close()

    # --- requests ------------------------------------------------------------------

    def _pay(self, session: Session, ch: Channel, pay: Pay) -> None:
        """Start (or join) the payment; the reply goes out from a callback when its
        answer is known, so nothing waits per `pay` request."""
        payer_id = session.payer_id
        rid = pay.id

        def reply(outcome: Outcome) -> None:
            self._reply(ch, rid, payer_id, outcome)

        answer = self.service.pipeline.begin(payer_id, pay, reply)
        if answer is not None:
            self._reply(ch, rid, payer_id, answer)

    def _reply(self, ch: Channel, rid: int, payer_id: str, outcome: Outcome) -> None:
        if ch.closed:
            return  # the sender retries the same tx_id after reconnecting
        try:
            if outcome.code is None:
                assert outcome.seq is not None
                assert outcome.dtg is not None
                ch.send_nowait(Paid(re=rid, tx_id=outcome.tx_id, seq=outcome.seq,
                                    dtg=outcome.dtg,
                                    balance=self.service.book.accounts.balance(payer_id),
                                    proof=outcome.proof))
            else:
                ch.send_nowait(Error(re=rid, code=outcome.code.value, message=outcome.message,
                                     tx_id=outcome.tx_id))
        except ConnectionLost:
            pass

    async def _history(self, session: Session, ch: Channel, msg: History) -> None:
        limit = min(msg.limit, HISTORY_MAX_ROWS)
        try:
            page = await self.service.ledger.read(msg.from_seq, limit, party=session.payer_id)
        except LedgerUnavailable as exc:
            ch.reply_error(msg.id, ErrorCode.LEDGER_UNAVAILABLE, str(exc))
            return
        rows, next_seq = page.rows, page.next_seq
        reply = HistoryReply(re=msg.id, rows=rows, next_seq=next_seq, more=page.more)
        # The ledger's page fits its frame; ours may be smaller: send fewer rows then.
        while len(rows) > 1 and len(encode(reply)) + 64 > self.service.cfg.router.max_frame_bytes:
            rows = rows[: len(rows) // 2]
            reply = HistoryReply(re=msg.id, rows=rows, next_seq=rows[-1].seq + 1, more=True)
        if not ch.closed:
            ch.send_nowait(reply)

    async def _status_from_ledger(self, session: Session, ch: Channel, msg: Status) -> None:
        """A payment the router has not in memory (older than its start's recent rows):
        the ledger knows whether it was paid."""
        try:
            await self.service.pipeline.recall([(msg.sender or session.payer_id, msg.tx_id)])
        except LedgerUnavailable as exc:
            ch.reply_error(msg.id, ErrorCode.LEDGER_UNAVAILABLE, str(exc))
            return
        if not ch.closed:
            ch.send_nowait(self._status(session, msg))

    def _status(self, session: Session, msg: Status) -> StatusReply:
        """Only about a payment the caller sent or received: anything else is `unknown`,
        exactly like a payment that does not exist."""
        me = session.payer_id
        rec = self.service.book.txs.get(msg.sender or me, msg.tx_id)
        if rec is None or me not in (rec.params.sender, rec.params.receiver):
            return StatusReply(re=msg.id, tx_id=msg.tx_id, state="unknown")
        state: TxState = rec.state.value
        detail = None
        plugins = self.service.plugins
        if plugins.enabled and rec.params.sender == me and rec.state is RecordState.PAID:
            try:
                note = plugins.status(me, msg.tx_id)
            except PluginFailed as exc:
                log.error("%s", exc, exc_info=exc.__cause__)
                note = None
            if note is not None:
                state = "mixed" if note.state == "mixed" else state
                detail = note.detail or None
        return StatusReply(re=msg.id, tx_id=msg.tx_id, state=state, code=rec.code,
                           seq=rec.seq, sender=rec.params.sender, receiver=rec.params.receiver,
                           amount=rec.params.amount, detail=detail)
