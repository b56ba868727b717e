"""The PostgreSQL store (asyncpg): the ledger's rows in one table, a batch per transaction.

Tables (created on first open, under an advisory lock):
- `jackpay_rows`: seq (primary key), dtg, sender, receiver, amount (minor units), tx_id,
  memo, hash — the CSV file's fields, the same hash chain (ledger/rows.py), so the same
  payments give byte-identical rows and hashes in both stores. Unique on (sender, tx_id);
  indexed by (sender, seq) and (receiver, seq) for paged reads of one party.
- `jackpay_balances`: the balance of every account, updated in the batch's transaction
  (the router's start can read balances instead of replaying every row).
- `jackpay_fence`: one row, the fencing epoch and who holds it.

Rules:
- A batch is one statement, `SELECT jackpay_append(...)` in autocommit: one round trip,
  one transaction, all rows or none (group commit through the database). Inside it the
  function checks, before writing, that this service's epoch is still the fence's
  (else SQLSTATE JPF01: `Fenced`), that the batch continues the stored chain (its first
  row's previous hash is the stored head's), inserts the rows and updates balances.
- Opening the store takes the log over: the epoch is bumped in its own committed
  transaction, after which no older service can commit (its append checks the epoch
  under FOR SHARE, so a takeover waits for an append in flight and an append after it
  sees the new epoch). What fences what: the epoch fences a stale *ledger service*; an
  old *primary* left running is fenced by its synchronous standby (it cannot acknowledge
  a commit without one); `target_session_attrs=read-write` only picks a server at
  connect time and fences nothing.
- Any failure of an append other than a definite refusal by the server (a constraint, a
  bad value, the fence) is in doubt: the transaction may have committed ("committed
  locally, but might not have been replicated"). It is resolved by asking, never
  guessed: on a fresh connection, the old backend is terminated if it still lives, then a
  barrier transaction (touch the fence row at our epoch, look the batch's keys up,
  commit) — its commit waits for the synchronous standby, and WAL is sequential, so
  what it saw is replicated by the time it returns. Found with our hashes: committed.
  Not found: not committed, written again. The barrier is retried until it answers.
- The writer follows the writable server without waiting for an append: when its
  connection ends (the primary died, a failover), a background task reconnects through
  the multi-host DSN (`target_session_attrs=read-write`, checked only at connect) and
  runs the barrier transaction, so the next append finds a live connection. Appends and
  reconnects take turns (one lock): one writer connection, one statement at a time.
- A store opened on a server with a synchronous standby (`synchronous_standby_names`
  set) never writes to one without: a promoted server that has no synchronous standby
  configured is not used (retried, logged) until one is, so no append is acknowledged
  that only one machine holds. Every session runs `synchronous_commit = on`.
- No timeout is ever put on a commit (cancelling one that waits for the standby commits
  it locally). A commit waiting long is logged, every few seconds.
- Memory does not grow with rows: the index keeps the head and a bounded cache of
  recent rows; a key not in the cache is assumed new, and the unique index is the
  judge (a violation is looked up and the batch resolved again). Reads are paged from
  the table by index and never show rows past the acknowledged head.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.connect_utils import SessionAttribute

from common.files import fsync_dir
from common.logs import log_event
from common.messages import LedgerRow, RowIn
from ledger.index import Key, ReadResult, RecentIndex, resolve
from ledger.rows import GENESIS_HASH, HEADER_LINE, format_line
from ledger.storage import SLOW_FSYNC_US, AppendOutcome, Fenced, StoreStats

log = logging.getLogger("jackpay.ledger")

SCHEMA_LOCK = 7_300_001  # pg_advisory_xact_lock key for creating the tables
FENCED_STATE = "JPF01"
CHAIN_STATE = "JPC01"
APPEND_ATTEMPTS = 3
SLOW_COMMIT_LOG_S = 5.0
CONNECT_TIMEOUT_S = 10.0
RETRY_MAX_S = 2.0

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jackpay_rows (
    seq      bigint PRIMARY KEY CHECK (seq > 0),
    dtg      text   NOT NULL,
    sender   text   NOT NULL,
    receiver text   NOT NULL,
    amount   bigint NOT NULL CHECK (amount > 0),
    tx_id    text   NOT NULL,
    memo     text   NOT NULL,
    hash     text   NOT NULL,
    sender_sig   bytea,
    receiver_sig bytea,
    UNIQUE (sender, tx_id)
);
-- Tables made before signed payments get the two columns (NULL: unsigned).
ALTER TABLE jackpay_rows ADD COLUMN IF NOT EXISTS sender_sig bytea;
ALTER TABLE jackpay_rows ADD COLUMN IF NOT EXISTS receiver_sig bytea;
CREATE INDEX IF NOT EXISTS jackpay_rows_sender_seq ON jackpay_rows (sender, seq);
CREATE INDEX IF NOT EXISTS jackpay_rows_receiver_seq ON jackpay_rows (receiver, seq);
CREATE TABLE IF NOT EXISTS jackpay_balances (
    account text   PRIMARY KEY,
    balance bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS jackpay_fence (
    id     int         PRIMARY KEY CHECK (id = 1),
    epoch  bigint      NOT NULL,
    holder text        NOT NULL,
    since  timestamptz NOT NULL
);
INSERT INTO jackpay_fence VALUES (1, 0, '', now()) ON CONFLICT (id) DO NOTHING;
DROP FUNCTION IF EXISTS jackpay_append(bigint, text, bigint[], text[], text[], text[],
                                       bigint[], text[], text[], text[]);
CREATE OR REPLACE FUNCTION jackpay_append(
    p_epoch bigint, p_prev_hash text, p_seq bigint[], p_dtg text[], p_sender text[],
    p_receiver text[], p_amount bigint[], p_tx_id text[], p_memo text[], p_hash text[],
    p_sender_sig bytea[], p_receiver_sig bytea[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    held bigint;
BEGIN
    SELECT epoch INTO held FROM jackpay_fence WHERE id = 1 FOR SHARE;
    IF held IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION 'fenced: the store is held at epoch %, this ledger service has %',
            held, p_epoch USING ERRCODE = '{FENCED_STATE}';
    END IF;
    IF p_seq[1] > 1 AND NOT EXISTS (
            SELECT 1 FROM jackpay_rows WHERE seq = p_seq[1] - 1 AND hash = p_prev_hash) THEN
        RAISE EXCEPTION 'batch from seq % does not continue the stored chain', p_seq[1]
            USING ERRCODE = '{CHAIN_STATE}';
    END IF;
    INSERT INTO jackpay_rows (seq, dtg, sender, receiver, amount, tx_id, memo, hash,
                              sender_sig, receiver_sig)
        SELECT * FROM unnest(p_seq, p_dtg, p_sender, p_receiver, p_amount, p_tx_id,
                             p_memo, p_hash, p_sender_sig, p_receiver_sig);
    INSERT INTO jackpay_balances AS b (account, balance)
        SELECT account, sum(delta) FROM (
            SELECT s AS account, -a AS delta FROM unnest(p_sender, p_amount) AS u(s, a)
            UNION ALL
            SELECT r, a FROM unnest(p_receiver, p_amount) AS v(r, a)) AS d
        GROUP BY account ORDER BY account
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + EXCLUDED.balance;
    RETURN p_seq[array_length(p_seq, 1)];
END $$;
"""

ROW_COLUMNS = "seq, dtg, sender, receiver, amount, tx_id, memo, hash, sender_sig, receiver_sig"
_APPEND = "SELECT jackpay_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
_HEAD = "SELECT seq, hash FROM jackpay_rows ORDER BY seq DESC LIMIT 1"
_LOOKUP = (f"SELECT {ROW_COLUMNS} FROM jackpay_rows JOIN unnest($1::text[], $2::text[]) "
           "AS k(s, t) ON sender = k.s AND tx_id = k.t")
_READ = f"SELECT {ROW_COLUMNS} FROM jackpay_rows WHERE seq >= $1 AND seq <= $3 ORDER BY seq LIMIT $2"
_READ_PARTY = f"""
SELECT {', '.join('r.' + c for c in ROW_COLUMNS.split(', '))} FROM (
    (SELECT seq FROM jackpay_rows WHERE sender = $3 AND seq >= $1 AND seq <= $4
     ORDER BY seq LIMIT $2)
    UNION
    (SELECT seq FROM jackpay_rows WHERE receiver = $3 AND seq >= $1 AND seq <= $4
     ORDER BY seq LIMIT $2)
) AS s JOIN jackpay_rows AS r USING (seq) ORDER BY r.seq LIMIT $2
"""


def is_dsn(text: str) -> bool:
    """Whether `text` names a PostgreSQL database (a URI) rather than a file."""
    return text.startswith(("postgresql://", "postgres://"))


def row_of(rec: Any) -> LedgerRow:
    return LedgerRow(seq=rec[0], dtg=rec[1], sender=rec[2], receiver=rec[3], amount=rec[4],
                     tx_id=rec[5], memo=rec[6], hash=rec[7], sender_sig=rec[8],
                     receiver_sig=rec[9])


def _definite(exc: BaseException) -> bool:
    """The server refused the statement, so its transaction rolled back: a constraint or
    bad value (classes 22, 23), a missing object or syntax (42), or our own checks."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, asyncpg.PostgresError) and isinstance(state, str) and (
        state[:2] in ("22", "23", "42") or state in (FENCED_STATE, CHAIN_STATE))


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection to the writable server of `dsn` (every host of a multi-host DSN is
    tried). Raises OSError, asyncpg errors, TimeoutError."""
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn, target_session_attrs=SessionAttribute.read_write, timeout=CONNECT_TIMEOUT_S,
        server_settings={"application_name": "jackpay-ledger", "synchronous_commit": "on"})
    return conn


class PgStore:
    """The ledger's rows in PostgreSQL; the LedgerStorage interface (ledger/storage.py)."""

    kind = "postgresql"

    def __init__(self, dsn: str, *, holder: str, cache_rows: int) -> None:
        self.dsn = dsn
        self.holder = holder
        self.epoch = 0
        self.index = RecentIndex(0, GENESIS_HASH, cache_rows)
        self._conn: asyncpg.Connection | None = None
        self._backend: tuple[int, Any] | None = None  # (pid, backend_start) of _conn
        self._pool: asyncpg.Pool | None = None
        self.commits = 0
        self.commit_us_total = 0
        self.commit_us_max = 0
        self.slow_commits = 0
        self.in_doubt = 0  # appends whose outcome had to be asked
        self.conflict_lookups = 0  # unique violations resolved by asking the table
        self._slow_handle: asyncio.TimerHandle | None = None
        self._writer = asyncio.Lock()  # appends and reconnects take turns on _conn
        self._follow: asyncio.Task[None] | None = None  # the background reconnect
        self._closed = False
        self._fenced: str | None = None  # found by a background reconnect
        # Told at once when a background reconnect finds the store fenced (the service
        # stops then, not at its next append).
        self.on_fenced: Callable[[str], None] | None = None
        self._sync_names = ""  # the first server's synchronous_standby_names
        self.reconnects = 0

    # --- open / close --------------------------------------------------------------

    @classmethod
    async def open(cls, dsn: str, *, holder: str | None = None,
                   cache_rows: int = 100_000) -> PgStore:
        """Connect, create the tables if needed, take the store over (bump the fencing
        epoch: an older ledger service can no longer commit) and read the chain head.
        The takeover is a commit, so it waits for a synchronous standby.
        Raises OSError, TimeoutError, asyncpg errors (the caller says what to do)."""
        store = cls(dsn, holder=holder or f"{socket.gethostname()}:{os.getpid()}",
                    cache_rows=cache_rows)
        conn = await connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
                await conn.execute(SCHEMA)
            store.epoch = await conn.fetchval(
                "UPDATE jackpay_fence SET epoch = epoch + 1, holder = $1, since = now() "
                "WHERE id = 1 RETURNING epoch", store.holder)
            head = await conn.fetchrow(_HEAD)
            store._sync_names = await conn.fetchval("SHOW synchronous_standby_names")
        except BaseException:
            await conn.close()
            raise
        store._adopt(conn, await store._backend_of(conn))
        if head is not None:
            store.index.set_head(head[0], head[1])
        store._pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=4, target_session_attrs=SessionAttribute.read_write,
            timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": "jackpay-ledger-read"})
        log_event(log, "postgresql store taken over", epoch=store.epoch, rows=store.last_seq,
                  holder=store.holder)
        return store

    async def aclose(self) -> None:
        self._closed = True
        if self._follow is not None:
            self._follow.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

    def close(self) -> None:
        """Drop the connections at once (no await)."""
        self._closed = True
        if self._follow is not None:
            self._follow.cancel()
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _adopt(self, conn: asyncpg.Connection, backend: tuple[int, Any]) -> None:
        """Make `conn` the writer; when it ends, reconnect at once (not at the next append)."""
        self._conn, self._backend = conn, backend
        conn.add_termination_listener(self._on_writer_lost)

    def _on_writer_lost(self, conn: Any) -> None:
        if conn is not self._conn or self._closed:
            return  # replaced or closed by us
        if self._follow is None or self._follow.done():
            log_event(log, "lost the database connection; reconnecting", logging.WARNING)
            self._follow = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Follow the writable server now: reconnect and run the barrier (an append
        waiting for the lock finds the new connection)."""
        async with self._writer:
            if self._closed or (self._conn is not None and not self._conn.is_closed()):
                return
            t0 = time.monotonic()
            try:
                await self._settle([])
            except Fenced as exc:
                self._fenced = str(exc)
                log_event(log, "fenced while reconnecting", logging.ERROR, reason=str(exc))
                if self.on_fenced is not None:
                    self.on_fenced(self._fenced)
                return
            self.reconnects += 1
            log_event(log, "reconnected to the writable server", seconds=round(
                time.monotonic() - t0, 2), rows=self.last_seq, epoch=self.epoch)

    @staticmethod
    async def _backend_of(conn: asyncpg.Connection) -> tuple[int, Any]:
        rec = await conn.fetchrow("SELECT pid, backend_start FROM pg_stat_activity "
                                  "WHERE pid = pg_backend_pid()")
        assert rec is not None
        return rec[0], rec[1]

    # --- queries -------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.index.last_seq

    @property
    def last_hash(self) -> str:
        return self.index.last_hash

    def statistics(self) -> StoreStats:
        return StoreStats(rows=self.last_seq, fsyncs=self.commits, batches=self.commits,
                          fsync_us_total=self.commit_us_total, fsync_us_max=self.commit_us_max,
                          slow_fsyncs=self.slow_commits)

    async def read_rows(self, from_seq: int, limit: int, party: str | None) -> ReadResult:
        """A page by index; rows past the acknowledged head are never shown."""
        head = self.index.last_seq
        if self._pool is None:
            raise RuntimeError("the store is closed")
        async with self._pool.acquire() as conn:
            if party is None:
                recs = await conn.fetch(_READ, from_seq, limit, head)
                page = [row_of(r) for r in recs]
                nxt = from_seq + len(page)
                return ReadResult(page, nxt, nxt <= head)
            recs = await conn.fetch(_READ_PARTY, from_seq, limit + 1, party, head)
        page = [row_of(r) for r in recs[:limit]]
        nxt = page[-1].seq + 1 if page else max(from_seq, head + 1)
        return ReadResult(page, nxt, len(recs) > limit)

    async def lookup(self, keys: Iterable[Key]) -> dict[Key, LedgerRow]:
        """The stored rows of these (sender, tx_id) keys (committed ones only)."""
        keys = list(keys)
        if self._pool is None:
            raise RuntimeError("the store is closed")
        async with self._pool.acquire() as conn:
            recs = await conn.fetch(_LOOKUP, [k[0] for k in keys], [k[1] for k in keys])
        return {(r[2], r[5]): row_of(r) for r in recs}

    async def balances(self) -> dict[str, int]:
        if self._pool is None:
            raise RuntimeError("the store is closed")
        async with self._pool.acquire() as conn:
            recs = await conn.fetch("SELECT account, balance FROM jackpay_balances")
        return {r[0]: r[1] for r in recs}

    async def balances_page(self, after: str, limit: int) -> tuple[list[tuple[str, int]], bool]:
        """By the balances table's key, not by memory: the router's start reads these."""
        if self._pool is None:
            raise RuntimeError("the store is closed")
        async with self._pool.acquire() as conn:
            recs = await conn.fetch("SELECT account, balance FROM jackpay_balances WHERE "
                                    "account > $1 ORDER BY account LIMIT $2", after, limit + 1)
        return [(r[0], r[1]) for r in recs[:limit]], len(recs) > limit

    # --- appends -------------------------------------------------------------------

    async def append_batch(self, requests: list[list[RowIn]], dtg: str,
                           atomic: list[bool] | None) -> AppendOutcome:
        """Resolve, write in one transaction, resolve any doubt by asking. Raises Fenced."""
        async with self._writer:
            if self._fenced is not None:
                raise Fenced(self._fenced)
            return await self._append(requests, dtg, atomic)

    async def _append(self, requests: list[list[RowIn]], dtg: str,
                      atomic: list[bool] | None) -> AppendOutcome:
        index = self.index
        known: dict[Key, LedgerRow] = {}

        def lookup(key: Key) -> LedgerRow | None:
            return index.get(key) or known.get(key)

        failure = "not written"
        resolutions, rows = resolve(requests, dtg, atomic, last_seq=index.last_seq,
                                    last_hash=index.last_hash, lookup=lookup)
        # An atomic request with a known row and rows not in the cache: its answer (the
        # group refused whole, and which row it names) depends on those rows, which the
        # unique index would not reveal. Ask for them first (rare: retries).
        unsure = [(r.sender, r.tx_id) for i, (rows_in, res)
                  in enumerate(zip(requests, resolutions, strict=True))
                  if atomic is not None and atomic[i] and res.status[0] != "written"
                  for r in rows_in if lookup((r.sender, r.tx_id)) is None]
        if unsure:
            found = await self._settle(unsure)
            known.update(found)
            index.remember(found.values())
            resolutions, rows = resolve(requests, dtg, atomic, last_seq=index.last_seq,
                                        last_hash=index.last_hash, lookup=lookup)
        for _ in range(APPEND_ATTEMPTS):
            if not rows:
                return AppendOutcome(resolutions)
            keys = [(r.sender, r.tx_id) for r in rows]
            try:
                us = await self._write(rows)
            except Fenced:
                raise
            except Exception as exc:
                if _definite(exc) and getattr(exc, "sqlstate", "") not in ("23505", CHAIN_STATE):
                    return AppendOutcome(resolutions, failure=f"the database refused the "
                                         f"batch: {exc}")
                if not _definite(exc):
                    self.in_doubt += 1
                    log_event(log, "append in doubt; asking the database", logging.WARNING,
                              rows=len(rows), error=repr(exc))
                else:
                    self.conflict_lookups += 1
                found = await self._settle(keys)
                mine = [found.get(k) for k in keys]
                if all(f is not None and f.hash == r.hash for f, r in zip(mine, rows,
                                                                          strict=True)):
                    index.add(rows)
                    return AppendOutcome(resolutions, rows)
                if any(f is not None and f.hash == r.hash for f, r in zip(mine, rows,
                                                                          strict=True)):
                    raise AssertionError("part of one transaction's rows is stored") from exc
                failure = f"not written ({type(exc).__name__}: {exc})"
                known.update(found)
                index.remember(found.values())
                resolutions, rows = resolve(requests, dtg, atomic, last_seq=index.last_seq,
                                            last_hash=index.last_hash, lookup=lookup)
                continue
            index.add(rows)
            self.commits += 1
            self.commit_us_total += us
            self.commit_us_max = max(self.commit_us_max, us)
            if us >= SLOW_FSYNC_US:
                self.slow_commits += 1
            return AppendOutcome(resolutions, rows, durable_us=us)
        return AppendOutcome(resolutions, failure=f"{failure}; gave up after "
                             f"{APPEND_ATTEMPTS} attempts")

    async def _write(self, rows: list[LedgerRow]) -> int:
        """One transaction; returns its time in microseconds. Raises Fenced, or whatever
        the driver raised (the caller decides: definite or in doubt)."""
        if self._conn is None or self._conn.is_closed():
            raise ConnectionError("no connection to the database")
        args = (self.epoch, self.index.last_hash, [r.seq for r in rows], [r.dtg for r in rows],
                [r.sender for r in rows], [r.receiver for r in rows], [r.amount for r in rows],
                [r.tx_id for r in rows], [r.memo for r in rows], [r.hash for r in rows],
                [r.sender_sig for r in rows], [r.receiver_sig for r in rows])
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        self._slow_handle = loop.call_later(SLOW_COMMIT_LOG_S, self._still_committing, t0,
                                            len(rows))
        try:
            await self._conn.fetchval(_APPEND, *args)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == FENCED_STATE:
                raise Fenced(str(exc)) from exc
            raise
        finally:
            if self._slow_handle is not None:
                self._slow_handle.cancel()
        return (time.perf_counter_ns() - t0) // 1000

    def _still_committing(self, t0: int, rows: int) -> None:
        s = (time.perf_counter_ns() - t0) / 1e9
        log_event(log, "commit still waiting (a synchronous standby away?)", logging.WARNING,
                  seconds=round(s, 1), rows=rows)
        loop = asyncio.get_running_loop()
        self._slow_handle = loop.call_later(SLOW_COMMIT_LOG_S, self._still_committing, t0, rows)

    async def _settle(self, keys: list[Key]) -> dict[Key, LedgerRow]:
        """Ask which of `keys` are stored, in a way whose answer is final: on a fresh
        connection (it replaces the writer's), end the old backend if it still lives,
        then look the keys up inside a write transaction that checks our epoch; its
        commit waits for the synchronous standby, so what it saw is replicated. Retries
        until answered; reloads the chain head. Raises Fenced."""
        delay = 0.05
        last_log = 0.0
        while True:
            old, self._conn = self._conn, None
            if old is not None:
                old.terminate()
            try:
                conn = await connect(self.dsn)
                try:
                    await self._check_sync(conn)
                    if self._backend is not None:
                        await self._end_backend(conn, *self._backend)
                    async with conn.transaction():
                        epoch = await conn.fetchval(
                            "UPDATE jackpay_fence SET since = since WHERE id = 1 AND epoch = $1 "
                            "RETURNING epoch", self.epoch)
                        if epoch is None:
                            raise Fenced(f"the store was taken over by another ledger service "
                                         f"(this one had epoch {self.epoch})",
                                         in_doubt=bool(keys))
                        recs = await conn.fetch(_LOOKUP, [k[0] for k in keys],
                                                [k[1] for k in keys])
                    head = await conn.fetchrow(_HEAD)
                    backend = await self._backend_of(conn)
                except BaseException:
                    conn.terminate()
                    raise
            except Fenced:
                raise
            except Exception as exc:
                now = time.monotonic()
                if now - last_log >= 5.0:
                    log_event(log, "cannot ask the database yet; retrying", logging.WARNING,
                              error=repr(exc))
                    last_log = now
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._adopt(conn, backend)
            acked = self.index.last_seq
            stored = head[0] if head is not None else 0
            if stored < acked:
                # A server without them was promoted: receipts already given name rows it
                # lacks. Writing on would give their seqs to other payments.
                self._fenced = (f"acknowledged rows are missing on the writable server "
                                f"(acknowledged up to seq {acked}, stored up to {stored}: "
                                "was a server without them promoted?); not writing again")
                raise Fenced(self._fenced, in_doubt=bool(keys))
            if head is None:
                self.index.set_head(0, GENESIS_HASH)
            else:
                self.index.set_head(head[0], head[1])
            return {(r[2], r[5]): row_of(r) for r in recs}

    async def _check_sync(self, conn: asyncpg.Connection) -> None:
        """Refuse a server without a synchronous standby if the first one had one
        (raises RuntimeError: _settle logs it and tries again)."""
        if not self._sync_names:
            return
        names = await conn.fetchval("SHOW synchronous_standby_names")
        if not names:
            raise RuntimeError("the writable server has no synchronous standby configured "
                               f"(synchronous_standby_names is empty; this store was opened "
                               f"with {self._sync_names!r}): not writing until it has one")

    @staticmethod
    async def _end_backend(conn: asyncpg.Connection, pid: int, started: Any) -> None:
        """Terminate our old writer's backend, if this server still runs it, and wait
        until it is gone: a commit it was still waiting on is then decided."""
        match = ("SELECT pid FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2")
        if await conn.fetchval(match, pid, started) is None:
            return
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        for _ in range(200):
            if await conn.fetchval(match, pid, started) is None:
                return
            await asyncio.sleep(0.025)
        raise TimeoutError(f"the old writer's backend {pid} is still there after 5 s")


# --- offline tools: export and verify -------------------------------------------------


async def export_csv(dsn: str, path: Path) -> int:
    """Write the ledger's CSV file (the seed's format, byte-identical to what the CSV
    store writes for the same rows) from the database, from one snapshot; the file
    appears whole (temp file, fsync, rename). Returns the rows written."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # two exports never share one
    n = 0
    try:
        # An offline tool: nothing else runs on this loop, blocking writes are fine.
        with open(tmp, "w", encoding="utf-8", newline="") as f:  # noqa: ASYNC230
            f.write(HEADER_LINE)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                async for rec in conn.cursor(f"SELECT {ROW_COLUMNS} FROM jackpay_rows ORDER BY seq",
                                             prefetch=5000):
                    f.write(format_line(row_of(rec)))
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the new name itself is durable
    finally:
        tmp.unlink(missing_ok=True)
        await conn.close()
    return n

