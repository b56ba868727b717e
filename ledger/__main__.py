"""`python -m ledger` / `jackpay-ledger`: run the ledger service; `verify` and `export` offline.

    jackpay-ledger --config network.toml [--host H] [--port P] [--path CSV] [--dsn DSN]
    jackpay-ledger verify ledger.csv | postgresql://USER@HOST:PORT/DB [--keys network.toml]
    jackpay-ledger export --csv OUT.csv (--dsn DSN | --config network.toml)

The store is the config's `[ledger] store`: the CSV file at `path`, or PostgreSQL at `dsn`
(ledger/pgstore.py; `--dsn` overrides the config's and implies store = "postgresql").
`export --csv` writes the seed's CSV file from the database (byte-identical to what the
CSV store would hold for the same payments); `verify` checks either.

Serves TLS 1.3 with its certificate from the network's keys (`jackpay-keys CONFIG`) and
demands a client certificate from the network CA (ledger/server.py says who may do what).
Prints `READY ledger addr=HOST:PORT rows=N` on stdout once it serves; stops on SIGTERM
or SIGINT after writing every append already received (exit 0). Exit 2: bad config,
missing or unsafe keys, a ledger file it refuses to trust, or a database it cannot reach
(the message says why). Exit 3: fenced — another ledger service took the database over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import asyncpg

from common.aio import run
from common.config import LedgerConfig, NetworkConfig, load_config, server_limits
from common.errors import ConfigError
from common.keys import LEDGER_SIGNER, KeyStore
from common.logs import LOG_LEVELS, log_event, setup_logging
from common.metrics import serve_metrics
from common.procs import print_ready
from common.tls import refuse_plain_off_loopback, server_context
from common.version import add_version
from ledger.pgstore import PgStore, export_csv, is_dsn
from ledger.server import LedgerAccess, LedgerServer
from ledger.storage import LedgerStorage
from ledger.store import LedgerCorrupt, LedgerInUse, LedgerStore
from ledger.verify import receipt_check, signature_audit, verify_database, verify_file

log = logging.getLogger("jackpay.ledger")

# What reaching a database can raise that is not a bug: it is down, refuses us, or the
# DSN does not parse (a port that is not a number).
DB_ERRORS = (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError,
             asyncpg.ClientConfigurationError)


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jackpay-ledger", description="Run the JackPay ledger.",
                                allow_abbrev=False)
    p.add_argument("--config", required=True,
                   help="network TOML file (its [ledger] section; keys from [network] keys_dir)")
    p.add_argument("--host", help="address to listen on (overrides the config)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one")
    p.add_argument("--path", help="ledger CSV file (overrides the config)")
    p.add_argument("--dsn", help="PostgreSQL store at this URI (overrides the config's store)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    # No TLS, no client certificates: for the benchmark's comparison run only.
    p.add_argument("--plain-benchmark-only", action="store_true", help=argparse.SUPPRESS)
    add_version(p)
    return p


def ledger_access(cfg: NetworkConfig, *, plain: bool = False) -> LedgerAccess:
    """The ledger's TLS context and who it admits. Raises ConfigError (KeyFileError)."""
    lc = cfg.ledger
    if plain:
        return LedgerAccess(None, frozenset(lc.auditors), lc.handshake_timeout_s,
                            server_limits(lc))
    store = KeyStore.for_config(cfg)
    return LedgerAccess(server_context(store, "ledger", client_certs=True),
                        frozenset(lc.auditors), lc.handshake_timeout_s, server_limits(lc),
                        store.load_signer(LEDGER_SIGNER), cfg.network.id)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["verify"]:
        vp = argparse.ArgumentParser(prog="jackpay-ledger verify",
                                     description="Check a ledger CSV file or database offline.")
        vp.add_argument("path", help="the CSV file, or a postgresql:// DSN")
        vp.add_argument("--keys", metavar="CONFIG",
                        help="also check every row's signatures against the public keys of "
                             "the participants of this network config")
        vp.add_argument("--receipts", metavar="DIR|FILE", type=Path,
                        help="also hold the ledger against the receipts of it kept by "
                             "payers (*.jsonl in DIR, or one such file); needs --keys "
                             "(the ledger's key)")
        vargs = vp.parse_args(args_list[1:])
        audit = receipts = None
        if vargs.receipts and not vargs.keys:
            vp.error("--receipts needs --keys CONFIG (the ledger's public key is there)")
        if vargs.keys:
            try:
                audit = signature_audit(vargs.keys)
                if vargs.receipts:
                    receipts = receipt_check(vargs.keys, vargs.receipts)
            except (ConfigError, ValueError, OSError) as exc:
                print(f"FAIL cannot read the keys or the receipts: {exc}")
                return 2
        if is_dsn(vargs.path):
            try:
                verdict = asyncio.run(verify_database(vargs.path, audit, receipts))
            except DB_ERRORS as exc:
                print(f"FAIL cannot read the database: {exc}")
                return 2
        else:
            verdict = verify_file(Path(vargs.path), audit, receipts)
        print(verdict.line)
        return 0 if verdict.ok else 1
    if args_list[:1] == ["export"]:
        return _export(args_list[1:])
    args = _serve_parser().parse_args(args_list)
    setup_logging(json_lines=args.log_json, level=args.log_level)
    try:
        cfg = load_config(args.config)
        access = ledger_access(cfg, plain=args.plain_benchmark_only)
    except ConfigError as exc:
        print(f"jackpay-ledger: {exc}", file=sys.stderr)
        return 2
    lc: LedgerConfig = cfg.ledger
    host = args.host or lc.host
    if access.tls is None:
        try:
            refuse_plain_off_loopback(host, "jackpay-ledger")
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        log_event(log, "PLAIN TCP, NO CLIENT CERTIFICATES: benchmark comparison only, "
                  "never a network", logging.WARNING)
    port = lc.port if args.port is None else args.port
    path = Path(args.path) if args.path else cfg.resolve(lc.path)
    dsn = args.dsn or (lc.dsn if lc.store == "postgresql" else "")
    if args.dsn is not None and not is_dsn(args.dsn):
        print("jackpay-ledger: --dsn must be a URI starting with postgresql://", file=sys.stderr)
        return 2
    if not 0 <= port <= 65535:
        print(f"jackpay-ledger: port {port} is out of range 0-65535", file=sys.stderr)
        return 2
    return run(lambda: serve(path, host, port, lc, access, dsn=dsn))


def _export(argv: list[str]) -> int:
    ep = argparse.ArgumentParser(prog="jackpay-ledger export",
                                 description="Write the ledger's CSV file from its database.")
    ep.add_argument("--csv", required=True, type=Path, help="the file to write")
    src = ep.add_mutually_exclusive_group(required=True)
    src.add_argument("--dsn", help="the database (postgresql://...)")
    src.add_argument("--config", help="network TOML whose [ledger] dsn names the database")
    args = ep.parse_args(argv)
    dsn = args.dsn
    if args.config:
        try:
            dsn = load_config(args.config).ledger.dsn
        except ConfigError as exc:
            print(f"jackpay-ledger export: {exc}", file=sys.stderr)
            return 2
    if not dsn or not is_dsn(dsn):
        print("jackpay-ledger export: no postgresql:// DSN to export from", file=sys.stderr)
        return 2
    try:
        n = asyncio.run(export_csv(dsn, args.csv))
    except DB_ERRORS as exc:
        print(f"jackpay-ledger export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {args.csv}")
    return 0


async def _open_store(path: Path, dsn: str) -> LedgerStorage | None:
    """The configured store, or None after saying on stderr why it cannot be opened."""
    if dsn:
        where = dsn.split("@")[-1]
        try:
            return await PgStore.open(dsn)
        except DB_ERRORS as exc:
            print(f"jackpay-ledger: cannot open the database at {where}: {exc}; is it "
                  "running, and is the DSN right?", file=sys.stderr)
            return None
    try:
        store = LedgerStore.open(path)
    except (LedgerCorrupt, LedgerInUse) as exc:
        print(f"jackpay-ledger: refusing to start: {exc} (file left untouched)", file=sys.stderr)
        return None
    except OSError as exc:
        print(f"jackpay-ledger: cannot open {path}: {exc.strerror or exc}", file=sys.stderr)
        return None
    if store.truncated_bytes:
        log_event(log, "cut off a torn last line", logging.WARNING, path=str(path),
                  bytes=store.truncated_bytes)
    return store


async def serve(path: Path, host: str, port: int, lc: LedgerConfig, access: LedgerAccess,
                *, dsn: str = "") -> int:
    store = await _open_store(path, dsn)
    if store is None:
        return 2
    server = LedgerServer(store, access, host=host, port=port, max_frame_bytes=lc.max_frame_bytes,
                          max_batch_rows=lc.max_batch_rows)
    try:
        h, p = await server.start()
    except OSError as exc:
        await store.aclose()
        print(f"jackpay-ledger: cannot listen on {host}:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    extra: dict[str, str] = {}
    metrics_server = None
    if lc.metrics_addr:
        try:
            mh, mp, metrics_server = serve_metrics(lc.metrics_addr, server.metrics)
        except (OSError, ConfigError) as exc:
            await server.stop()
            print(f"jackpay-ledger: metrics at {lc.metrics_addr}: {exc}", file=sys.stderr)
            return 2
        extra["metrics"] = f"{mh}:{mp}"
    log_event(log, "ledger serving", addr=f"{h}:{p}", store=store.kind,
              path=str(path) if store.kind == "csv" else dsn.split("@")[-1],
              rows=store.last_seq, metrics=extra.get("metrics"),
              rows_read_at_open=getattr(store, "rows_read_at_open", None))
    print_ready("ledger", addr=f"{h}:{p}", rows=store.last_seq, **extra)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fenced = asyncio.ensure_future(server.on_fenced.wait())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({fenced, stopping}, return_when=asyncio.FIRST_COMPLETED)
    fenced.cancel()
    stopping.cancel()
    log_event(log, "stopping", stats=server.statistics())
    if metrics_server is not None:
        metrics_server.shutdown()
    await server.stop()
    log_event(log, "stopped")
    return 3 if server.fenced else 0


if __name__ == "__main__":
    sys.exit(main())
