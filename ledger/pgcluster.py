"""Throwaway PostgreSQL 15 clusters for tests, scripts and chaos runs. Blocking code.

    python -m ledger.pgcluster start DIR [--port N] [--standbys N] [--sync "ANY 1 (s1, s2)"]
    python -m ledger.pgcluster stop DIR          (fast shutdown of every server; DIR kept)
    python -m ledger.pgcluster destroy DIR       (kill every server, remove DIR)

Rules:
- One folder holds the whole cluster: a data folder per server (`primary`, `s1`, ...),
  its log (`NAME.log`), the unix sockets, and `cluster.json` (ports, roles) so that a
  later `stop` or a test that reopens the folder finds the servers again.
- PostgreSQL refuses to run as root. Run as root, every server command runs as the
  unprivileged `postgres` user (subprocess `user=`/`group=`) and the folder is owned by
  it; run as anyone else, as that user.
- Throwaway means trust: `initdb --auth=trust`, so anyone on this machine who can reach
  127.0.0.1 or the socket folder may connect as any role, replication included. Servers
  listen on 127.0.0.1 only. Never use this for a network that holds real money.
- Durability is real: fsync and synchronous_commit stay on (the benchmark's numbers and
  the tests' "a commit waits for its standby" depend on it). `wal_log_hints = on`, so an
  old primary can be brought back as a standby with `pg_rewind`.
- The port, listen address and socket folder of each server are given on its command
  line, which wins over the configuration files: `pg_basebackup` and `pg_rewind` copy
  another server's files, and a copy must not inherit that server's port.
- `synchronous_standby_names` is set with ALTER SYSTEM on the current primary and
  reloaded; a new standby starts with it empty (what it copied from the primary does not
  make it wait for itself once promoted).

Errors: ClusterError says which command failed and shows the end of its output or log.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import JackPayError
from common.files import load_json
from common.procs import children

PG_MAJOR = 15
DEFAULT_BINDIR = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
DATABASE = "jackpay"
STATE_FILE = "cluster.json"
READY_TIMEOUT_S = 60.0

# Settings every server of a throwaway cluster gets (postgresql.conf, copied to standbys).
BASE_SETTINGS = {
    "wal_level": "replica",
    "wal_log_hints": "on",        # pg_rewind needs it (or data checksums)
    "max_wal_senders": "10",
    "wal_keep_size": "'256MB'",   # a standby down for a while can still catch up
    "hot_standby": "on",
    "max_connections": "60",
    "shared_buffers": "'64MB'",
    "fsync": "on",
    "synchronous_commit": "on",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %a '",
}


class ClusterError(JackPayError):
    """A PostgreSQL command failed or a server did not become ready (the message says which)."""


def find_bindir() -> Path:
    """The PostgreSQL 15 server binaries. Raises ClusterError (how to install them)."""
    if (DEFAULT_BINDIR / "initdb").exists():
        return DEFAULT_BINDIR
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").exists() and (Path(out) / "pg_rewind").exists():
            return Path(out)
    raise ClusterError(f"PostgreSQL {PG_MAJOR} server binaries not found (no "
                       f"{DEFAULT_BINDIR}/initdb); install them: apt-get install -y "
                       f"postgresql-{PG_MAJOR} (scripts/test does it for you)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class RunAs:
    """Who runs the servers: `postgres` when we are root, else ourselves."""

    uid: int
    gid: int
    name: str

    @classmethod
    def for_servers(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid(), pwd.getpwuid(os.geteuid()).pw_name)
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise ClusterError("running as root, but there is no `postgres` user to run "
                               "PostgreSQL as (it comes with the postgresql package)") from None
        return cls(pw.pw_uid, pw.pw_gid, pw.pw_name)

    def popen_args(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(slots=True)
class PgNode:
    """One server of the cluster: its data folder, port and (when we started it) process."""

    name: str
    port: int
    root: Path
    bindir: Path
    run_as: RunAs
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def datadir(self) -> Path:
        return self.root / self.name

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def dsn(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str, timeout: float = 120.0) -> str:
        """Run a PostgreSQL tool as the servers' user; its stdout. Raises ClusterError."""
        argv = [str(self.bindir / tool), *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.root, env=self._env(), check=False,
                                  **self.run_as.popen_args())  # type: ignore[call-overload]
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{tool} did not finish within {timeout:g} s "
                               f"({' '.join(argv)})") from None
        if done.returncode != 0:
            raise ClusterError(f"{tool} failed (exit {done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")
        out: str = done.stdout
        return out

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(self.root)})
        return env

    def sql(self, query: str, *more: str, database: str = "postgres",
            timeout: float = 60.0) -> str:
        """Run statements with psql, each on its own (ALTER SYSTEM may not share a
        transaction); the last one's rows as `a|b` lines."""
        args = ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                "-p", str(self.port), "-U", "postgres", "-d", database]
        for q in (query, *more):
            args += ["-c", q]
        return self.run("psql", *args, timeout=timeout).strip()

    # --- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the server and wait until it accepts connections (a standby: once it
        is in hot standby). Raises ClusterError with the end of its log."""
        if self.running():
            return
        log = open(self.log_path, "ab")
        try:
            self.run_as.chown(self.log_path)
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.socket_dir}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root, env=self._env(), start_new_session=True,
                **self.run_as.popen_args())  # type: ignore[call-overload]
        finally:
            log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        pidfile = self.datadir / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"PostgreSQL {self.name} (port {self.port}) exited with "
                                   f"{self.proc.returncode} while starting; its log:\n"
                                   f"{_tail(self.log_path)}")
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            # Line 8 is the postmaster's status, as pg_ctl -w reads it.
            if len(lines) >= 8 and lines[7].strip() in ("ready", "standby"):
                return
            time.sleep(0.05)
        raise ClusterError(f"PostgreSQL {self.name} (port {self.port}) not ready after "
                           f"{timeout:g} s; its log:\n{_tail(self.log_path)}")

    def pid(self) -> int | None:
        """The postmaster's pid, if one is running on this data folder."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Shut down (`fast`: roll back open transactions, checkpoint, exit). Idempotent."""
        pid = self.pid()
        if pid is None:
            self._reap()
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        os.kill(pid, sig)
        self._wait_gone(pid, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of this server (a machine lost)."""
        pid = self.pid()
        if pid is None:
            return
        kids = children(pid)
        os.kill(pid, signal.SIGKILL)
        for c in kids:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_gone(pid, 10.0)
        for c in kids:
            _wait_pid_gone(c, 10.0)
        # A killed postmaster whose parent does not reap it stays a zombie, and a zombie's
        # pid in postmaster.pid makes the next start (or pg_rewind's recovery) refuse.
        # Its lock file is stale: a machine that lost power would not have that pid either.
        (self.datadir / "postmaster.pid").unlink(missing_ok=True)
        for stale in (f".s.PGSQL.{self.port}.lock", f".s.PGSQL.{self.port}"):
            (self.socket_dir / stale).unlink(missing_ok=True)

    def _wait_gone(self, pid: int, timeout: float) -> None:
        if self.proc is not None and self.proc.pid == pid:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise ClusterError(f"PostgreSQL {self.name} did not stop within "
                                   f"{timeout:g} s") from None
            self.proc = None
            return
        if not _wait_pid_gone(pid, timeout):
            raise ClusterError(f"PostgreSQL {self.name} (pid {pid}) did not stop within "
                               f"{timeout:g} s")

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()
            self.proc = None

    def is_in_recovery(self) -> bool:
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def write_standby_settings(self, primary: PgNode) -> None:
        """Make this data folder a standby of `primary`: standby.signal, and in
        postgresql.auto.conf its own primary_conninfo (with `application_name` = this
        server's name, what synchronous_standby_names lists) and no sync names of its own."""
        auto = self.datadir / "postgresql.auto.conf"
        try:
            lines = auto.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        drop = ("primary_conninfo", "synchronous_standby_names", "primary_slot_name")
        kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in drop]
        kept.append(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                    f"application_name={self.name}'")
        kept.append("synchronous_standby_names = ''")
        auto.write_text("\n".join(kept) + "\n")
        self.run_as.chown(auto)
        signal_file = self.datadir / "standby.signal"
        signal_file.touch()
        self.run_as.chown(signal_file)


def _alive(pid: int) -> bool:
    """Running and not a zombie (a killed server whose parent is gone may linger as one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # ours: reap it
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


class PgCluster:
    """A primary and its streaming standbys in one folder.

    `create()` makes a new one (initdb, start, database `jackpay`); `open(root)` finds an
    existing one from its cluster.json. `primary` is whichever server was last made
    primary (`create`, `promote`).
    """

    def __init__(self, root: Path, bindir: Path, run_as: RunAs, *, owns_root: bool) -> None:
        self.root = root
        self.bindir = bindir
        self.run_as = run_as
        self.owns_root = owns_root
        self.nodes: dict[str, PgNode] = {}
        self.primary_name = ""
        self.sync_names = ""

    # --- creation ------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path | None = None, *, port: int = 0, name: str = "primary",
               bindir: Path | None = None) -> PgCluster:
        """initdb a new cluster and start its primary. `root` None: a new temp folder,
        removed by `destroy()`. Raises ClusterError."""
        bindir = bindir or find_bindir()
        run_as = RunAs.for_servers()
        owns = root is None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="jackpay-pg-"))
        else:
            root.mkdir(parents=True, exist_ok=True)
            if (root / STATE_FILE).exists():
                raise ClusterError(f"{root} already holds a cluster ({STATE_FILE}); "
                                   "stop/destroy it or pick another folder")
        root = root.resolve()
        _make_reachable(root, run_as)
        cluster = cls(root, bindir, run_as, owns_root=owns)
        (root / "sock").mkdir(mode=0o700, exist_ok=True)
        run_as.chown(root / "sock")
        node = PgNode(name, port or free_port(), root, bindir, run_as)
        try:
            node.run("initdb", "-D", str(node.datadir), "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--no-locale", "--no-instructions")
            with open(node.datadir / "postgresql.conf", "a") as f:
                f.write("\n# jackpay throwaway cluster (ledger/pgcluster.py)\n")
                f.writelines(f"{k} = {v}\n" for k, v in BASE_SETTINGS.items())
            cluster.nodes[name] = node
            cluster.primary_name = name
            cluster.save()
            node.start()
            node.sql(f"CREATE DATABASE {DATABASE}")
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @classmethod
    def start_or_create(cls, root: Path, *, standbys: int = 1, sync: str | None = None,
                        port: int = 0) -> PgCluster:
        """The cluster in `root` started again if there is one; else a new one: a primary
        and `standbys` streaming standbys, `sync` (default: s1 when there is a standby) as
        synchronous_standby_names, each listed standby waited for as synchronous. Raises
        ClusterError (a new cluster is stopped again)."""
        if (root / STATE_FILE).exists():
            cluster = cls.open(root)
            for node in [cluster.primary, *cluster.standbys]:
                node.start()
            return cluster
        cluster = cls.create(root, port=port)
        try:
            for i in range(1, standbys + 1):
                cluster.add_standby(f"s{i}")
            names = sync if sync is not None else ("s1" if standbys else "")
            if names:
                cluster.set_sync(names)
            listed = set(names.replace("(", " ").replace(")", " ").replace(",", " ").split())
            for node in cluster.standbys:
                cluster.wait_streaming(node.name, sync=node.name in listed)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def open(cls, root: Path) -> PgCluster:
        """The cluster described by `root`/cluster.json (servers running or not)."""
        root = root.resolve()
        try:
            state = load_json((root / STATE_FILE).read_bytes())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{root} holds no cluster ({STATE_FILE}: {exc})") from None
        cluster = cls(root, Path(state["bindir"]), RunAs.for_servers(), owns_root=False)
        for name, port in state["nodes"].items():
            cluster.nodes[name] = PgNode(name, int(port), root, cluster.bindir, cluster.run_as)
        cluster.primary_name = state["primary"]
        cluster.sync_names = state.get("sync", "")
        return cluster

    def save(self) -> None:
        state = {"bindir": str(self.bindir), "primary": self.primary_name, "sync": self.sync_names,
                 "nodes": {n.name: n.port for n in self.nodes.values()}}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    @property
    def primary(self) -> PgNode:
        return self.nodes[self.primary_name]

    @property
    def standbys(self) -> list[PgNode]:
        return [n for n in self.nodes.values() if n.name != self.primary_name]

    def add_standby(self, name: str, *, port: int = 0, start: bool = True) -> PgNode:
        """A streaming standby of the current primary, made with `pg_basebackup -R`,
        connecting with `application_name` = `name`. Raises ClusterError."""
        if name in self.nodes:
            raise ClusterError(f"the cluster already has a server named {name!r}")
        primary = self.primary
        node = PgNode(name, port or free_port(), self.root, self.bindir, self.run_as)
        node.run("pg_basebackup", "-h", str(primary.socket_dir), "-p", str(primary.port),
                 "-U", "postgres", "-D", str(node.datadir), "-R", "-X", "stream",
                 "--checkpoint=fast", "--no-password", timeout=300)
        node.write_standby_settings(primary)
        self.nodes[name] = node
        self.save()
        if start:
            node.start()
        return node

    # --- replication ---------------------------------------------------------------

    def set_sync(self, names: str) -> None:
        """Set `synchronous_standby_names` on the primary and reload: one name (`s1`),
        a quorum (`ANY 1 (s1, s2)`), or "" for none (commits stop waiting)."""
        quoted = names.replace("'", "''")
        self.primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{quoted}'",
                         "SELECT pg_reload_conf()")
        self.sync_names = names
        self.save()

    def wait_streaming(self, name: str, *, sync: bool = False, timeout: float = 60.0) -> None:
        """Wait until the primary shows standby `name` streaming (and, with `sync`, as one
        that synchronous_standby_names lists: sync, quorum, or potential — next in line)."""
        deadline = time.monotonic() + timeout
        want = ("sync", "quorum", "potential") if sync else ("async", "potential", "sync",
                                                             "quorum")
        while time.monotonic() < deadline:
            got = self.primary.sql("SELECT state || ' ' || sync_state FROM pg_stat_replication "
                                   f"WHERE application_name = '{name}'")
            for line in got.splitlines():
                state, sync_state = line.split()
                if state == "streaming" and sync_state in want:
                    return
            time.sleep(0.1)
        raise ClusterError(f"standby {name} is not streaming to {self.primary_name} after "
                           f"{timeout:g} s; its log:\n{_tail(self.nodes[name].log_path)}")

    def promote(self, name: str, timeout: float = 60.0, *, sync: str = "") -> None:
        """Promote standby `name` (`pg_ctl promote -w`); it becomes `primary`. The old
        primary is not touched: stop or kill it first (a failover), or `rewind` it.
        `sync`: the synchronous_standby_names the new primary has from its first
        transaction on (set in its postgresql.auto.conf and reloaded before the promotion:
        no window in which a commit is acknowledged without a standby); "" for none."""
        node = self.nodes[name]
        if sync:
            auto = node.datadir / "postgresql.auto.conf"
            lines = [ln for ln in auto.read_text().splitlines()
                     if ln.split("=", 1)[0].strip() != "synchronous_standby_names"]
            quoted = sync.replace("'", "''")
            lines.append(f"synchronous_standby_names = '{quoted}'")
            auto.write_text("\n".join(lines) + "\n")
            self.run_as.chown(auto)
            node.sql("SELECT pg_reload_conf()")
        node.run("pg_ctl", "promote", "-D", str(node.datadir), "-w", "-t", str(int(timeout)),
                 timeout=timeout + 10)
        self.primary_name = name
        self.sync_names = sync
        self.save()

    def rewind(self, name: str, *, start: bool = True) -> PgNode:
        """Bring a former primary back as a standby of the current primary with
        `pg_rewind` (stops it first if it still runs; pg_rewind itself runs crash recovery
        on a server that was killed). Raises ClusterError."""
        node = self.nodes[name]
        if name == self.primary_name:
            raise ClusterError(f"{name} is the primary; promote another server first")
        node.stop()
        primary = self.primary
        # pg_rewind reads the source's timeline from its control file, which a freshly
        # promoted server updates only at its next checkpoint ("no rewind required").
        primary.sql("CHECKPOINT")
        node.run("pg_rewind", f"--target-pgdata={node.datadir}",
                 f"--source-server=host={primary.socket_dir} port={primary.port} "
                 "user=postgres dbname=postgres", timeout=300)
        node.write_standby_settings(primary)
        if start:
            node.start()
        return node

    # --- connection strings --------------------------------------------------------

    def dsn(self, database: str = DATABASE) -> str:
        """The primary's DSN."""
        return self.primary.dsn(database)

    def multi_host_dsn(self, database: str = DATABASE) -> str:
        """Every server, primary first, for a client that follows the writable one."""
        order = [self.primary, *self.standbys]
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in order)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    # --- teardown ------------------------------------------------------------------

    def stop(self) -> None:
        """Fast shutdown of every server (standbys first). Idempotent."""
        for node in [*self.standbys, self.primary]:
            try:
                node.stop()
            except ClusterError:
                node.kill()

    def destroy(self) -> None:
        """Kill every server and remove the folder. Idempotent; never raises."""
        for node in self.nodes.values():
            try:
                node.kill()
            except (ClusterError, OSError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _make_reachable(root: Path, run_as: RunAs) -> None:
    """The servers' user must own `root` and reach it: every folder above it needs the
    search (x) bit for others (a pytest tmp_path is 0700 root, so use mkdtemp)."""
    run_as.chown(root)
    os.chmod(root, 0o700)
    if os.geteuid() != 0:
        return
    for parent in root.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise ClusterError(f"{root} is inside {parent}, which user {run_as.name} cannot "
                               "enter; put the cluster elsewhere (e.g. under /tmp)")


# --- the command line ----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ledger.pgcluster",
                                description="A throwaway PostgreSQL 15 cluster (trust auth, "
                                            "127.0.0.1 only) for tests and local networks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="create (or restart) the cluster in DIR; prints DSNs")
    st.add_argument("dir", type=Path)
    st.add_argument("--port", type=int, default=0, help="the primary's port (0: a free one)")
    st.add_argument("--standbys", type=int, default=0, help="streaming standbys s1, s2, ...")
    st.add_argument("--sync", default=None,
                    help='synchronous_standby_names, e.g. "s1" or "ANY 1 (s1, s2)" '
                         "(default with standbys: s1; with none: \"\")")
    for name, text in (("stop", "fast shutdown of every server (the folder is kept)"),
                       ("destroy", "kill every server and remove DIR")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "start":
            return _start(args.dir, args.port, args.standbys, args.sync)
        cluster = PgCluster.open(args.dir)
        if args.cmd == "stop":
            cluster.stop()
        else:
            cluster.destroy()
        print(f"{args.cmd}: {args.dir}")
        return 0
    except ClusterError as exc:
        print(f"pgcluster: {exc}", file=sys.stderr)
        return 1


def _start(root: Path, port: int, standbys: int, sync: str | None) -> int:
    if not 0 <= port <= 65535 or standbys < 0:
        raise ClusterError("--port must be 0-65535 and --standbys at least 0")
    cluster = PgCluster.start_or_create(root, standbys=standbys, sync=sync, port=port)
    print(f"primary {cluster.primary.name} {cluster.dsn()}")
    for node in cluster.standbys:
        print(f"standby {node.name} {node.dsn()}")
    print(f"dsn {cluster.multi_host_dsn()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
