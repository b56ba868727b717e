"""The scripts run from the user's own folder: every path they are given means what it
means in the user's shell (`cd ~/mynet && ~/jackpay/scripts/up network.toml`), never a
path in the repository, and a package-named folder there (common/, bench/, ...) does not
shadow JackPay's. Each test runs a script as a user would, from a temp folder."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netkit import REPO_ROOT, plant_decoys, script_env

SCRIPTS = REPO_ROOT / "scripts"
CONFIG = """\
[network]
id = "paths"

[ledger]
host = "127.0.0.1"
port = 0
path = "ledger.csv"

[router]
host = "127.0.0.1"
port = 0
admin_socket = "admin.sock"

[payer]
control_dir = "ctl"

[[participants]]
id = "alice"
opening_balance = "10.00"

[[participants]]
id = "bob"
opening_balance = "2.00"
"""


class Lines:
    """A child's stdout read line by line on a thread, to wait for a line with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                self._q.put(line)
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, needle: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return False
            self.seen.append(line)
            if needle in line:
                return True
        return False

    def rest(self, seconds: float = 10) -> str:
        self.wait_for("\0never\0", seconds)
        return "".join(self.seen)


# --- scripts/up ------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_up_uses_the_callers_config_and_run_dir(tmp_path: Path, absolute: bool) -> None:
    user = tmp_path / "home"  # where the user is: their config is in a folder below it
    user.mkdir()
    before = plant_decoys(user)
    (user / "mynet").mkdir()
    (user / "mynet" / "network.toml").write_text(CONFIG)
    before.add("mynet")
    config = str(user / "mynet" / "network.toml") if absolute else "mynet/network.toml"
    run_dir = str(tmp_path / "elsewhere" / "logs") if absolute else "logs/today"
    logs = Path(run_dir) if absolute else user / run_dir
    up = subprocess.Popen([str(SCRIPTS / "up"), config, "--run-dir", run_dir, "--ephemeral"],
                          cwd=user, env=script_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    out = Lines(up)
    try:
        started = out.wait_for("Ctrl-C stops everything", 90)
        assert started, out.rest(1) + (up.stderr.read() if up.poll() is not None and up.stderr
                                       else "")
        text = "".join(out.seen)
        assert f"logs and pids in {logs}" in text
        # logs and pids in the run dir the user named, relative to where they are
        for name in ("ledger", "router", "alice", "bob"):
            assert (logs / f"{name}.log").exists(), name
            pid = int((logs / f"{name}.pid").read_text())
            os.kill(pid, 0)  # alive
        # the network's own files beside the user's config (its relative paths' rule)
        net = user / "mynet"
        assert (net / "keys" / "public" / "ca.crt").exists()
        assert (net / "ledger.csv").read_text().count("_open:") == 2
        assert (net / "ctl" / "alice.sock").exists()
        # the hint it prints works as typed, from the same folder
        assert f"--config {config} --id alice" in text
        balance = subprocess.run(
            [sys.executable, "-P", "-m", "payer_client", "balance", "--json", "--config",
             config, "--id", "alice"], cwd=user, capture_output=True, text=True, timeout=60,
            env=dict(script_env(), PYTHONPATH=str(REPO_ROOT)), check=False)
        assert balance.returncode == 0, balance.stderr
        assert json.loads(balance.stdout)["balance_minor"] == 1000
        expected = before | ({"logs"} if not absolute else set())
        assert {p.name for p in user.iterdir()} == expected
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, out.rest(1)
    assert "stopped: " in out.rest(5)
    assert not list(logs.glob("*.pid"))  # each removed as its process stopped


def test_up_names_the_callers_missing_config(tmp_path: Path) -> None:
    plant_decoys(tmp_path)
    proc = subprocess.run([str(SCRIPTS / "up"), "network.toml", "--ephemeral"], cwd=tmp_path,
                          env=script_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot read config {tmp_path / 'network.toml'}" in proc.stderr
    assert str(REPO_ROOT / "network.toml") not in proc.stderr


# --- scripts/chaos ---------------------------------------------------------------------


@pytest.mark.slow
def test_chaos_keep_from_another_folder(tmp_path: Path) -> None:
    before = plant_decoys(tmp_path)
    proc = subprocess.run([str(SCRIPTS / "chaos"), "--seconds", "2", "--seed", "5",
                           "--payers", "2", "--json", "--keep"], cwd=tmp_path,
                          env=script_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["verdict"] == "PASS"
    kept_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("run folder kept: ")]
    assert len(kept_lines) == 1, proc.stderr[-3000:]
    kept = Path(kept_lines[0].removeprefix("run folder kept: "))
    try:
        assert kept.is_absolute()  # usable from any folder
        assert (kept / "ledger.csv").exists()
        assert (kept / "logs" / "router.log").exists()
        assert {p.name for p in tmp_path.iterdir()} == before  # nothing left in the cwd
    finally:
        import shutil

        shutil.rmtree(kept, ignore_errors=True)
