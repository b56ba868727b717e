"""`python -m ledger` / `jackpay-ledger`: run the ledger service, or `verify PATH` offline.

    jackpay-ledger --config network.toml [--host H] [--port P] [--path CSV] [--log-json]
    jackpay-ledger verify ledger.csv

Serves TLS 1.3 with its certificate from the network's keys (`jackpay-keys CONFIG`) and
demands a client certificate from the network CA (ledger/server.py says who may do what).
Prints `READY ledger addr=HOST:PORT rows=N` on stdout once it serves; stops on SIGTERM
or SIGINT after writing every append already received (exit 0). Exit 2: bad config,
missing or unsafe keys, or a ledger file it refuses to trust (the message says why).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from common.aio import run
from common.config import LedgerConfig, NetworkConfig, load_config, server_limits
from common.errors import ConfigError
from common.keys import KeyStore
from common.logs import log_event, setup_logging
from common.metrics import serve_metrics
from common.procs import print_ready
from common.tls import refuse_plain_off_loopback, server_context
from common.version import add_version
from ledger.server import LedgerAccess, LedgerServer
from ledger.store import LedgerCorrupt, LedgerStore
from ledger.verify import verify_file

log = logging.getLogger("jackpay.ledger")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jackpay-ledger", description="Run the JackPay ledger.",
                                allow_abbrev=False)
    p.add_argument("--config", required=True,
                   help="network TOML file (its [ledger] section; keys from [network] keys_dir)")
    p.add_argument("--host", help="address to listen on (overrides the config)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one")
    p.add_argument("--path", help="ledger CSV file (overrides the config)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    p.add_argument("--log-level", default="INFO")
    # No TLS, no client certificates: for the benchmark's comparison run only.
    p.add_argument("--plain-benchmark-only", action="store_true", help=argparse.SUPPRESS)
    add_version(p)
    return p


def ledger_access(cfg: NetworkConfig, *, plain: bool = False) -> LedgerAccess:
    """The ledger's TLS context and who it admits. Raises ConfigError (KeyFileError)."""
    lc = cfg.ledger
    tls = None if plain else server_context(KeyStore.for_config(cfg), "ledger",
                                            client_certs=True)
    return LedgerAccess(tls, frozenset(lc.auditors), lc.handshake_timeout_s, server_limits(lc))


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["verify"]:
        vp = argparse.ArgumentParser(prog="jackpay-ledger verify",
                                     description="Check a ledger CSV offline.")
        vp.add_argument("path", type=Path)
        vargs = vp.parse_args(args_list[1:])
        verdict = verify_file(vargs.path)
        print(verdict.line)
        return 0 if verdict.ok else 1
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
    if not 0 <= port <= 65535:
        print(f"jackpay-ledger: port {port} is out of range 0-65535", file=sys.stderr)
        return 2
    return run(lambda: serve(path, host, port, lc, access))


async def serve(path: Path, host: str, port: int, lc: LedgerConfig, access: LedgerAccess) -> int:
    try:
        store = LedgerStore.open(path)
    except LedgerCorrupt as exc:
        print(f"jackpay-ledger: refusing to start: {exc} (file left untouched)", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"jackpay-ledger: cannot open {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if store.truncated_bytes:
        log_event(log, "cut off a torn last line", logging.WARNING, path=str(path),
                  bytes=store.truncated_bytes)
    server = LedgerServer(store, access, host=host, port=port, max_frame_bytes=lc.max_frame_bytes,
                          max_batch_rows=lc.max_batch_rows)
    try:
        h, p = await server.start()
    except OSError as exc:
        store.close()
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
            store.close()
            print(f"jackpay-ledger: metrics at {lc.metrics_addr}: {exc}", file=sys.stderr)
            return 2
        extra["metrics"] = f"{mh}:{mp}"
    log_event(log, "ledger serving", addr=f"{h}:{p}", path=str(path), rows=store.last_seq,
              metrics=extra.get("metrics"))
    print_ready("ledger", addr=f"{h}:{p}", rows=store.last_seq, **extra)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(log, "stopping", stats=server.statistics())
    if metrics_server is not None:
        metrics_server.shutdown()
    await server.stop()
    log_event(log, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
