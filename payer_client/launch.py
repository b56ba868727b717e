"""Start a whole JackPay network on this machine from one config (what `scripts/up` runs).

    python -m payer_client.launch [CONFIG] [--run-dir DIR] [--ephemeral]
                                  [--store postgresql [--standbys N] [--sync NAMES]]

First the network's keys: `jackpay-keys` (common.keygen) creates whatever is missing
(never replacing a key), so a new network needs no set-up step. Then the ledger, then
the router (told the ledger's real address with
`--ledger`), then one payer daemon per participant (told the router's with `--router`).
Each process is waited for until it prints its READY line; its stderr goes to
`<run-dir>/<name>.log` and its pid to `<run-dir>/<name>.pid`. `--ephemeral` binds ledger
and router to port 0 (the real ports come from READY lines). Ctrl-C or SIGTERM stops them
all in reverse order (SIGTERM, then SIGKILL after a grace period). Plain blocking code,
built on common.procs.Proc.

`--store postgresql` first starts a throwaway PostgreSQL 15 cluster (ledger.pgcluster:
a primary and, by default, one synchronous standby; trust auth on 127.0.0.1) in
`<run-dir>/pg` and runs the ledger on it (`--dsn`, the multi-host DSN that follows the
writable server); the table shows the DSN; Ctrl-C stops the network, then the cluster
(its data is kept in the run folder: `python -m ledger.pgcluster start <run-dir>/pg`
starts it again). Without it the config's own `[ledger] store` is used.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from common.config import NetworkConfig, load_config
from common.errors import ConfigError
from common.keygen import ensure_keys
from common.procs import Proc, ProcessFailed, python_module
from ledger.pgcluster import ClusterError, PgCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "network.example.toml"


@dataclass
class LocalNetwork:
    """The processes of one network; `start_all()` then `stop_all()`."""

    config_path: Path
    run_dir: Path
    ephemeral: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)
    created_keys: list[str] = field(default_factory=list)
    dsn: str | None = None  # the ledger's PostgreSQL store (--dsn); None: the config's store
    cluster: PgCluster | None = None  # a throwaway cluster we started (stopped at the end)

    def __post_init__(self) -> None:
        self.config: NetworkConfig = load_config(self.config_path)
        self.created_keys = ensure_keys(self.config)  # raises ConfigError
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.resolve(self.config.ledger.path).parent.mkdir(parents=True, exist_ok=True)
        self.config.resolve(self.config.payer.control_dir).mkdir(parents=True, exist_ok=True)
        self.config.resolve(self.config.router.admin_socket).parent.mkdir(parents=True,
                                                                          exist_ok=True)

    def env(self) -> dict[str, str]:
        """The environment its processes (and tools run against it) get."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _start(self, name: str, argv: list[str], preexec_fn: Any = None) -> Proc:
        proc = Proc(name, argv, self.run_dir / f"{name}.log", env=self.env(),
                    cwd=self.config_path.parent, preexec_fn=preexec_fn)
        self.procs[name] = proc
        try:
            proc.start()
        finally:
            if proc.popen is not None:
                (self.run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    @property
    def ledger_addr(self) -> str:
        return self.procs["ledger"].ready["addr"]

    @property
    def router_addr(self) -> str:
        return self.procs["router"].ready["addr"]

    def start_ledger(self, *, port: int | None = None, preexec_fn: Any = None) -> Proc:
        """`port`: a given one (a restart where the router expects it); `preexec_fn`: run
        in the child before exec (e.g. a file-size limit, to make writes fail)."""
        flag = ["--port", str(port)] if port is not None else (
            ["--port", "0"] if self.ephemeral else [])
        if self.dsn is not None:
            flag += ["--dsn", self.dsn]
        return self._start("ledger", python_module("ledger", "--config", str(self.config_path),
                                                   *flag), preexec_fn)

    def start_router(self) -> Proc:
        port = ["--port", "0"] if self.ephemeral else []
        return self._start("router", python_module(
            "router", "--config", str(self.config_path), "--ledger", self.ledger_addr, *port))

    def start_payer(self, payer_id: str) -> Proc:
        old = self.procs.get(payer_id)
        if old is not None and old.alive():
            raise ProcessFailed(f"{payer_id} is already running")
        return self._start(payer_id, python_module(
            "payer_client", "run", "--config", str(self.config_path), "--id", payer_id,
            "--router", self.router_addr))

    def stop(self, name: str) -> int:
        proc = self.procs[name]
        code = proc.stop()
        (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        return code

    def start_all(self) -> None:
        """Raises ProcessFailed (with the log's tail) if a process does not become ready;
        whatever did start is stopped again."""
        try:
            self.start_ledger()
            self.start_router()
            for p in self.config.participants:
                self.start_payer(p.id)
        except BaseException:
            self.stop_all()
            raise

    def stop_all(self) -> dict[str, int]:
        return {name: self.stop(name) for name in reversed(list(self.procs))}

    def start_cluster(self, standbys: int = 1, sync: str | None = None) -> PgCluster:
        """A throwaway PostgreSQL cluster in `<run-dir>/pg` (restarted if one is there):
        a primary and `standbys` streaming standbys, `sync` (default: s1 when there is a
        standby) as synchronous_standby_names. The ledger then runs on it. Raises
        ClusterError."""
        root = self.run_dir / "pg"
        if not root.exists() and not _servers_can_enter(self.run_dir):
            # PostgreSQL runs as its own user when we are root: it must be able to enter
            # every folder above its data. Keep the data in /tmp, linked from the run folder.
            root.symlink_to(tempfile.mkdtemp(prefix="jackpay-up-pg-"))
            os.chmod(root, 0o755)
        cluster = PgCluster.start_or_create(root, standbys=standbys, sync=sync)
        self.cluster = cluster
        self.dsn = cluster.multi_host_dsn()
        return cluster

    def stop_cluster(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def table(self) -> Table:
        table = Table(title=f"JackPay network ({self.config_path.name})")
        for col in ("process", "pid", "address / control socket", "log"):
            table.add_column(col)
        kinds = {p.id: p.kind for p in self.config.participants}
        for name, proc in self.procs.items():
            where = proc.ready.get("addr") or proc.ready.get("control", "")
            label = f"{name} ({kinds[name]})" if name in kinds else name
            state = str(proc.pid) if proc.alive() else "stopped"
            table.add_row(label, state, where, str(proc.log_path))
        if self.cluster is not None:
            for node in [self.cluster.primary, *self.cluster.standbys]:
                role = "primary" if node is self.cluster.primary else "standby"
                table.add_row(f"postgresql {node.name} ({role})", str(node.pid() or "stopped"),
                              f"127.0.0.1:{node.port}", str(node.log_path))
            table.add_row("ledger store", "", self.dsn or "", f"sync: {self.cluster.sync_names!r}")
        return table


def _servers_can_enter(folder: Path) -> bool:
    """Whether PostgreSQL's own user (used when we are root) can reach `folder`."""
    if os.geteuid() != 0:
        return True
    return all(os.stat(p).st_mode & 0o001 for p in [folder.resolve(), *folder.resolve().parents])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/up", description=(
        "Start ledger, router and every payer of CONFIG; Ctrl-C stops them all."))
    ap.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                    help="network TOML file, relative to the current folder (default: the "
                         "repository's network.example.toml)")
    ap.add_argument("--run-dir", type=Path, help="logs and pids, relative to the current folder "
                    "(default: <repository>/run/<timestamp>)")
    ap.add_argument("--ephemeral", action="store_true", help="ledger and router on port 0")
    ap.add_argument("--store", choices=["csv", "postgresql"], default=None,
                    help="postgresql: start a throwaway PostgreSQL cluster in <run-dir>/pg "
                         "and run the ledger on it (default: the config's [ledger] store)")
    ap.add_argument("--standbys", type=int, default=1,
                    help="with --store postgresql: streaming standbys (default 1)")
    ap.add_argument("--sync", default=None, help='with --store postgresql: '
                    'synchronous_standby_names, e.g. "ANY 1 (s1, s2)" (default: s1)')
    args = ap.parse_args(argv)
    if args.standbys < 0:
        ap.error("--standbys must be 0 or more")
    if args.store != "postgresql" and (args.sync is not None or args.standbys != 1):
        ap.error("--standbys and --sync need --store postgresql")
    # Paths the user typed are relative to the folder they ran us from (scripts/up does
    # not cd); made absolute here, once, as the processes we start run elsewhere.
    run_dir = (args.run_dir or REPO_ROOT / "run" / time.strftime("%Y%m%d-%H%M%S")).absolute()
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        net = LocalNetwork(Path(args.config).resolve(), run_dir, args.ephemeral)
    except ConfigError as exc:
        print(f"scripts/up: {exc}", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.store == "postgresql":
        console.print(f"starting PostgreSQL in {run_dir / 'pg'} "
                      f"({args.standbys} standby(s)) ...", highlight=False)
        try:
            net.start_cluster(args.standbys, args.sync)
        except ClusterError as exc:
            print(f"scripts/up: PostgreSQL: {exc}", file=sys.stderr)
            return 1
    elif args.store == "csv" and net.config.ledger.store != "csv":
        print("scripts/up: --store csv, but the config's [ledger] store is "
              f"{net.config.ledger.store!r}; edit the config", file=sys.stderr)
        return 2
    try:
        net.start_all()
    except ProcessFailed as exc:
        print(f"scripts/up: {exc}", file=sys.stderr)
        net.stop_cluster()
        return 1
    if net.created_keys:
        console.print("keys made for this network (kept for the next runs):\n  "
                      + "\n  ".join(net.created_keys), highlight=False)
    console.print(net.table())
    if net.cluster is not None:  # whole, for copy and paste (the table may wrap it)
        console.print(f"ledger store: postgresql, dsn {net.dsn}", soft_wrap=True,
                      highlight=False)
    first = net.config.participants[0].id if net.config.participants else "alice"
    console.print(f"logs and pids in {run_dir}\ntry:  jackpay-payer balance --config "
                  f"{args.config} --id {first}\nCtrl-C stops everything.")
    code = 0
    while not stop:
        dead = [n for n, p in net.procs.items() if not p.alive()]
        if dead:
            print(f"scripts/up: {', '.join(dead)} exited; stopping the rest "
                  f"(see the logs in {run_dir})", file=sys.stderr)
            code = 1
            break
        time.sleep(0.2)
    codes = net.stop_all()
    net.stop_cluster()
    console.print("stopped: " + ", ".join(f"{n} (exit {c})" for n, c in codes.items()))
    return code


if __name__ == "__main__":
    sys.exit(main())
