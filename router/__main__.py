"""`python -m router` / `jackpay-router`: run the router until SIGTERM.

    python -m router --config network.toml [--host H] [--port P] [--ledger H:P] [--log-json]
    python -m router inspect --config network.toml [--json]   # a running router's state
    python -m router reconcile --config network.toml [--json] # its book against the ledger
    python -m router top --config network.toml                # a live view, every second
    python -m router participants list|add|suspend|resume ... # participants at run time
    python -m router reload --config network.toml             # the config's participants

Serves payers over TLS 1.3 and logs them in with their Ed25519 keys; reaches the ledger
over mutual TLS. The keys come from the config's key folder (`jackpay-keys CONFIG`).
Prints `READY router addr=H:P admin=PATH` on stdout once it serves payers. Exit codes:
0 after SIGTERM/SIGINT (in-flight payments finished within the grace period), 1 when it
cannot start, 2 for an unusable config, argument or key.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from common.aio import run
from common.config import NetworkConfig, load_config
from common.errors import ConfigError
from common.logs import LOG_LEVELS, log_event, setup_logging
from common.procs import print_ready
from common.tls import refuse_plain_off_loopback
from common.version import add_version
from router.server import RouterSecurity, RouterService, StartupFailed

log = logging.getLogger("jackpay.router")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="jackpay-router", description="JackPay router",
                                 allow_abbrev=False)
    ap.add_argument("--config", required=True, help="network TOML file")
    ap.add_argument("--host", help="listen address (default: [router] host)")
    ap.add_argument("--port", type=int, help="listen port, 0 for any (default: [router] port)")
    ap.add_argument("--ledger", metavar="HOST:PORT", help="ledger address (default: [ledger])")
    ap.add_argument("--log-json", action="store_true", help="log JSON lines on stderr")
    ap.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    # No TLS and no login: for the benchmark's comparison run only.
    ap.add_argument("--plain-benchmark-only", action="store_true", help=argparse.SUPPRESS)
    # TLS and login, but payments' signatures not checked: the benchmark's comparison only.
    ap.add_argument("--unsigned-benchmark-only", action="store_true", help=argparse.SUPPRESS)
    # Every append's first attempt on the task path (as before issue 14): the benchmark's
    # `loop turns` comparison only.
    ap.add_argument("--append-task-path-benchmark-only", action="store_true",
                    help=argparse.SUPPRESS)
    add_version(ap)
    return ap.parse_args(argv)


def _ledger_address(args: argparse.Namespace, cfg: NetworkConfig) -> tuple[str, int]:
    if not args.ledger:
        return cfg.ledger.host, cfg.ledger.port
    host, sep, port = str(args.ledger).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ledger {args.ledger!r}: expected HOST:PORT, e.g. 127.0.0.1:7300")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["top"]:
        from router import top

        return top.main(argv[1:])
    if argv[:1] == ["participants"]:
        from router import participants_cli

        return participants_cli.main(argv[1:])
    if argv[:1] == ["reload"]:
        from router import participants_cli

        return participants_cli.reload_main(argv[1:])
    if argv[:1] == ["reconcile"]:
        from router import inspect_cli

        return inspect_cli.reconcile_main(argv[1:])
    if argv[:1] == ["inspect"]:
        from router import inspect_cli

        return inspect_cli.main(argv[1:])
    args = _parse_args(argv)
    setup_logging(json_lines=args.log_json, level=args.log_level)
    try:
        cfg = load_config(args.config)
        ledger_host, ledger_port = _ledger_address(args, cfg)
        security = RouterSecurity.from_config(cfg, plain=args.plain_benchmark_only)
        if security.tls is None or args.unsigned_benchmark_only:
            refuse_plain_off_loopback(args.host or cfg.router.host, "jackpay-router")
    except ConfigError as exc:
        print(f"jackpay-router: {exc}", file=sys.stderr)
        return 2
    if args.port is not None and not 0 <= args.port <= 65535:
        print(f"jackpay-router: --port {args.port} is out of range 0-65535", file=sys.stderr)
        return 2
    if security.tls is None:
        log_event(log, "PLAIN TCP, NO LOGIN: benchmark comparison only, never a network",
                  logging.WARNING)
    if args.unsigned_benchmark_only:
        log_event(log, "PAYMENT SIGNATURES NOT CHECKED: benchmark comparison only, never a "
                  "network", logging.WARNING)
    admin = cfg.resolve(cfg.router.admin_socket)
    try:
        service = RouterService(
            cfg,
            security,
            admin_path=admin,
            host=args.host or cfg.router.host,
            port=cfg.router.port if args.port is None else args.port,
            ledger_host=ledger_host,
            ledger_port=ledger_port,
            config_path=Path(args.config),
            check_signatures=not args.unsigned_benchmark_only,
        )
    except StartupFailed as exc:  # a plug-in that cannot be loaded or configured
        print(f"jackpay-router: {exc}", file=sys.stderr)
        return 2
    service.ledger.direct_first = not args.append_task_path_benchmark_only
    # Without uvloop, allocate and free one block larger than a socket read buffer so
    # glibc stops mmapping/unmapping 256 KiB on every read (PERFORMANCE-NOTES.md).
    warm = bytearray(1 << 20)
    del warm
    return run(lambda: serve(service, str(admin)))


async def serve(service: RouterService, admin_path: str) -> int:
    """Start, print the readiness line, serve until SIGTERM/SIGINT, shut down."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_soon)
    starting = loop.create_task(service.start(), name="router-start")
    stopping = loop.create_task(stop.wait(), name="router-stop-signal")
    died = loop.create_task(service.died.wait(), name="router-died")
    await asyncio.wait({starting, stopping, died}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log_event(log, "stopped before it was ready", logging.CRITICAL if died.done()
                  else logging.INFO, reason=service.death)
        for task in (starting, stopping, died):
            task.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await service.aclose()
        return 3 if died.done() else 0
    try:
        starting.result()
    except (StartupFailed, OSError, OverflowError) as exc:
        log_event(log, "cannot start", logging.ERROR, error=str(exc))
        stopping.cancel()
        died.cancel()
        await service.aclose()
        return 1
    # What startup built (modules, the replayed book) lives as long as the process: out
    # of the collector's reach, a full collection walks only what payments made since,
    # which halves the router's longest pauses (PERFORMANCE.md, "Third pass").
    gc.collect()
    gc.freeze()
    host, port = service.addr
    extra = {"metrics": service.metrics_at} if service.metrics_at else {}
    print_ready("router", addr=f"{host}:{port}", admin=admin_path, **extra)
    await asyncio.wait({stopping, died}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():  # common.aio.watch: a task it cannot work without ended
        stopping.cancel()
        log_event(log, "stopping: it cannot work on", logging.CRITICAL, reason=service.death)
        await service.shutdown()
        return 3
    died.cancel()
    await service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
