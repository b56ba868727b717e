"""Start real JackPay networks (tests, scripts/chaos): config in a folder, ports bound to 0.

    net = Network(tmp_path, participants={"alice": "100.00", "bob": "5.00"})
    net.start_ledger(); net.start_router(); net.start_payer("alice")
    ...
    net.stop_all()

Every process is a real OS process started with this interpreter; logs land in
`tmp_path/logs/<name>.log` and are printed by the fixture when a test fails. Security is
on as in any network: `write_config` makes the network's keys (`keys/` beside the
config, common.keygen) for every participant, so daemons, clients and tools log in.

The ledger's store: `store="csv"` (the default: `ledger.csv` in the folder) or
`store="postgresql"` with `dsn=` (written as `[ledger] store/dsn`; the database is the
caller's, e.g. a tests/pg.py fixture or a ledger.pgcluster cluster). `ledger_csv()`
gives the ledger's rows as the CSV file's text with either store.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PROTOCOL_VERSION
from common.aio import Channel, open_channel
from common.config import NetworkConfig, load_config
from common.keygen import ensure_keys
from common.keys import KeyStore
from common.messages import (
    LEDGER_REPLIES,
    Hello,
    InspectReply,
    Reconcile,
    ReconcileReply,
    Role,
    Welcome,
    decoder_for,
)
from common.procs import Proc, python_module
from common.tls import ClientTls, client_tls
from payer_client.client import PayerClient
from router.inspect_cli import NotAnswering, ask, fetch

REPO_ROOT = Path(__file__).resolve().parents[1]


def addr_text(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


async def open_ledger_channel(addr: tuple[str, int], *, tls: ClientTls | None,
                              role: Role = "router", peer: str | None = None,
                              timeout: float = 5.0) -> Channel:
    """A greeted connection to a ledger (or to a proxy in front of one), over `tls` (a
    client certificate: `Network.ledger_tls`). Each gets its own `peer` name unless one is
    given: the ledger fences a router's older connections when the same name says hello
    again."""
    ch = await open_channel(*addr, decoder_for(LEDGER_REPLIES), name="ledger", tls=tls,
                            connect_timeout=timeout)
    try:
        reply = await ch.request(Hello(id=0, version=PROTOCOL_VERSION, role=role,
                                       peer=peer or f"harness-{id(ch)}"), timeout=timeout)
    except BaseException:
        await ch.aclose()
        raise
    if not isinstance(reply, Welcome):
        await ch.aclose()
        raise TypeError(f"ledger answered hello with {type(reply).__name__}")
    return ch


async def inspect_router(admin_path: str, timeout: float = 5.0) -> InspectReply:
    """The router's own view (balances, holds, payments in flight) from its admin socket
    (router/inspect_cli.py's client). Raises NotAnswering."""
    return await fetch(admin_path, timeout)


async def reconcile_router(admin_path: str, timeout: float = 60.0) -> ReconcileReply:
    """The router's own check of its live book against the ledger (`jackpay-router
    reconcile`). Raises NotAnswering."""
    reply = await ask(admin_path, Reconcile(id=0), timeout)
    if not isinstance(reply, ReconcileReply):
        raise NotAnswering(f"the router answered reconcile with {type(reply).__name__}")
    return reply


async def wait_router_quiet(admin_path: str, seconds: float = 10.0) -> InspectReply:
    """The router's view once no payment is in flight and nothing is held, or after
    `seconds` (then the caller sees what is still in flight)."""
    deadline = time.monotonic() + seconds
    while True:
        state = await inspect_router(admin_path)
        quiet = not state.in_flight and not any(state.holds.values())
        if quiet or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)


def _toml_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Network:
    root: Path
    participants: dict[str, str] = field(default_factory=dict)
    max_incoming: dict[str, str] = field(default_factory=dict)
    router_settings: dict[str, Any] = field(default_factory=dict)
    ledger_settings: dict[str, Any] = field(default_factory=dict)
    payer_settings: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    network_id: str = "testnet"
    # `[plugins.<name>]` tables (enable them with router_settings["plugins"]).
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    store: str = "csv"  # or "postgresql" (then `dsn`)
    dsn: str = ""

    def __post_init__(self) -> None:
        if self.store not in ("csv", "postgresql"):
            raise ValueError(f"store must be 'csv' or 'postgresql', not {self.store!r}")
        if self.store == "postgresql" and not self.dsn:
            raise ValueError("store='postgresql' needs dsn='postgresql://...'")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "network.toml"
        self.write_config()

    # --- config --------------------------------------------------------------------

    def write_config(self, ledger_port: int = 0) -> None:
        """(Re)write network.toml; the router learns the ledger's real port from it."""
        lines = ["[network]", f'id = "{self.network_id}"', "",
                 "[ledger]", 'host = "127.0.0.1"', f"port = {ledger_port}", 'path = "ledger.csv"']
        if self.store == "postgresql":
            lines += ['store = "postgresql"', f"dsn = {_toml_value(self.dsn)}"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.ledger_settings.items()]
        lines += ["", "[router]", 'host = "127.0.0.1"', "port = 0", 'admin_socket = "router-admin.sock"']
        fast = {"freshness_window_s": 0.5, "ping_timeout_s": 0.5, "offer_timeout_s": 1.5,
                "ledger_timeout_s": 1.0, "outcome_pending_after_s": 2.0, "ledger_retry_max_s": 0.5,
                "shutdown_grace_s": 5.0}
        fast.update(self.router_settings)
        lines += [f"{k} = {_toml_value(v)}" for k, v in fast.items()]
        lines += ["", "[payer]", 'control_dir = "ctl"', "reconnect_max_s = 0.5"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.payer_settings.items()]
        for pid, opening in self.participants.items():
            lines += ["", "[[participants]]", f'id = "{pid}"', f'name = "{pid.title()}"',
                      f'opening_balance = "{opening}"']
            if pid in self.max_incoming:
                lines.append(f'max_incoming = "{self.max_incoming[pid]}"')
        for name, table in self.plugin_settings.items():
            lines += ["", f"[plugins.{name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        (self.root / "ctl").mkdir(exist_ok=True)
        ensure_keys(self.config)

    @property
    def keys(self) -> KeyStore:
        return KeyStore.for_config(self.config)

    def router_tls(self) -> ClientTls:
        """TLS to the router as any payer or tool has it (the network CA pinned)."""
        return client_tls(self.keys, "router")

    def ledger_tls(self, identity: str = "router-client") -> ClientTls:
        """TLS to the ledger with a client certificate of the network (`router-client`
        may append; `auditor` may read)."""
        return client_tls(self.keys, "ledger", identity=identity)

    async def ledger_channel(self, addr: tuple[str, int] | None = None, *,
                             identity: str = "router-client", role: Role = "router",
                             peer: str | None = None) -> Channel:
        """A greeted connection to the ledger (or to `addr`, e.g. a proxy)."""
        return await open_ledger_channel(addr or self.procs["ledger"].addr,
                                         tls=self.ledger_tls(identity), role=role, peer=peer)

    def client(self, payer_id: str, *, router: tuple[str, int] | None = None,
               **kw: Any) -> PayerClient:
        """An importable client for `payer_id`, logged in with its key (not yet connected)."""
        host, port = router if router is not None else self.procs["router"].addr
        return PayerClient.from_config(self.config, payer_id, host=host, port=port, **kw)

    @property
    def config(self) -> NetworkConfig:
        return load_config(self.config_path)

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.csv"

    def ledger_csv(self) -> str:
        """The ledger's rows as the CSV file's text (header first; "" before the first
        row with the CSV store). With PostgreSQL, `jackpay-ledger export --csv` (one
        snapshot of the database)."""
        if self.store == "csv":
            return self.ledger_path.read_text() if self.ledger_path.exists() else ""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ledger.csv"
            done = subprocess.run(python_module("ledger", "export", "--csv", str(out),
                                                "--dsn", self.dsn),
                                  capture_output=True, text=True, timeout=60, env=self.env(),
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"the ledger could not be exported: {done.stderr.strip()}")
            return out.read_text()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    # --- processes -----------------------------------------------------------------

    def _start(self, name: str, argv: list[str], preexec_fn: Any = None) -> Proc:
        old = self.procs.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"{name} is already running")
        proc = Proc(name, argv, self.root / "logs" / f"{name}.log", env=self.env(),
                    cwd=self.root, preexec_fn=preexec_fn)
        self.procs[name] = proc
        return proc.start()

    def start_ledger(self, *, preexec_fn: Any = None, port: int = 0) -> Proc:
        proc = self._start("ledger", python_module("ledger", "--config", str(self.config_path),
                                                   "--port", str(port)), preexec_fn)
        self.write_config(ledger_port=proc.addr[1])
        return proc

    def start_router(self, *, port: int = 0, ledger: tuple[str, int] | None = None) -> Proc:
        """Start the router; `ledger` overrides the config's ledger address (e.g. a proxy)."""
        argv = ["--config", str(self.config_path), "--port", str(port)]
        if ledger is not None:
            argv += ["--ledger", addr_text(ledger)]
        return self._start("router", python_module("router", *argv))

    def start_payer(self, payer_id: str, *extra: str, router: tuple[str, int] | None = None) -> Proc:
        """Start a payer daemon; `router` overrides the router's address (e.g. a proxy)."""
        addr = router if router is not None else self.procs["router"].addr
        return self._start(payer_id, python_module(
            "payer_client", "run", "--config", str(self.config_path), "--id", payer_id,
            "--router", addr_text(addr), *extra))

    def restart(self, name: str, *, preexec_fn: Any = "same") -> Proc:
        """Start a stopped or killed process again with the same command, on the same
        port it had (so peers and proxies find it where it was)."""
        old = self.procs[name]
        if old.alive():
            raise RuntimeError(f"{name} is still running")
        argv = list(old.argv)
        if "--port" in argv and "addr" in old.ready:
            argv[argv.index("--port") + 1] = str(old.addr[1])
        proc = Proc(name, argv, old.log_path, env=old.env, cwd=old.cwd,
                    preexec_fn=old.preexec_fn if preexec_fn == "same" else preexec_fn)
        self.procs[name] = proc
        return proc.start()

    @property
    def admin_path(self) -> str:
        return self.procs["router"].ready["admin"]

    async def inspect(self) -> InspectReply:
        return await inspect_router(self.admin_path)

    async def wait_ledger_connected(self, seconds: float = 15.0, *, connected: bool = True
                                    ) -> None:
        """Until the router is connected to its ledger (after a ledger restart the router
        may still be in its reconnect backoff, answering `ledger_unavailable`), or with
        `connected=False` until it has seen it go."""
        deadline = time.monotonic() + seconds
        while (await self.inspect()).ledger_connected is not connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router's ledger link is not {'up' if connected else 'down'}"
                                   f" after {seconds:.0f} s")
            await asyncio.sleep(0.05)

    async def reconcile(self) -> ReconcileReply:
        return await reconcile_router(self.admin_path)

    async def wait_quiet(self, seconds: float = 10.0) -> InspectReply:
        return await wait_router_quiet(self.admin_path, seconds)

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name in reversed(list(self.procs)):
            codes[name] = self.procs[name].stop()
        return codes

    def logs(self) -> str:
        out = []
        for name, proc in self.procs.items():
            out.append(f"===== {name} ({proc.log_path}) =====\n{proc.log_tail(60)}")
        return "\n".join(out)
