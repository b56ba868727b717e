"""The payer CLI as a user runs it: subprocesses against a real network (ledger, router
and payer daemons as OS processes), checking outputs and exit codes (0 ok, 1 refused,
2 usage/config, 3 daemon not reachable; `status`: 4 pending, 5 unknown), plus
scripts/demo end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar, get_args

import pytest
from netkit import REPO_ROOT, Network, plant_decoys, script_env

import payer_client.cli as cli_module
from common.errors import ConnectionLost, ErrorCode, RequestFailed
from common.messages import Send, Status, StatusReply, TxState

HAVE_NETWORK = all((REPO_ROOT / pkg / "__main__.py").exists() for pkg in ("router", "ledger"))
needs_network = pytest.mark.skipif(not HAVE_NETWORK, reason="router/ or ledger/ not built yet")


def cli(net: Network, who: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payer_client", *args, "--config", str(net.config_path),
         "--id", who], capture_output=True, text=True, env=net.env(), timeout=timeout,
        check=False)


def as_json(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def net(network: Network) -> Network:
    network.participants.update({"alice": "100.00", "bob": "5.00", "carol": "0.00"})
    network.max_incoming["carol"] = "10.00"
    network.write_config()
    network.start_ledger()
    network.start_router()
    for who in ("alice", "bob", "carol"):
        network.start_payer(who)
    return network


def ledger_rows(net: Network) -> list[str]:
    return [ln for ln in net.ledger_path.read_text().splitlines()[1:] if ln.strip()]


# --- with a network ---------------------------------------------------------------------


@needs_network
def test_send_balance_history_status_ping(net: Network) -> None:
    sent = cli(net, "alice", "send", "bob", "12.50", "--memo", "lunch", "--tx-id", "cli-1")
    assert sent.returncode == 0, sent.stderr
    assert "paid 12.50 to bob" in sent.stdout
    assert "tx_id=cli-1" in sent.stdout
    assert "balance=87.50" in sent.stdout

    doc = as_json(cli(net, "alice", "send", "bob", "12.50", "--memo", "lunch", "--tx-id",
                      "cli-1", "--json"))
    assert doc["outcome"] == "paid"
    assert doc["balance_minor"] == 8750
    assert len(ledger_rows(net)) == 3  # two openings (carol's is zero) + one payment

    bal = cli(net, "bob", "balance")
    assert bal.returncode == 0
    assert "balance 17.50" in bal.stdout
    assert as_json(cli(net, "bob", "balance", "--json"))["balance_minor"] == 1750

    hist = cli(net, "bob", "history")
    assert hist.returncode == 0
    assert "cli-1" in hist.stdout
    assert "+12.50" in hist.stdout
    assert "next page" not in hist.stdout  # bob has two rows: this was the last page
    doc = as_json(cli(net, "bob", "history", "--json"))
    assert [r["tx_id"] for r in doc["rows"]] == ["_open:bob", "cli-1"]
    assert doc["more"] is False
    first = cli(net, "bob", "history", "--limit", "1")
    assert "_open:bob" in first.stdout
    assert "next page: --from-seq" in first.stdout

    st = cli(net, "alice", "status", "cli-1")
    assert st.returncode == 0
    assert "paid" in st.stdout
    assert as_json(cli(net, "alice", "status", "cli-1", "--json"))["state"] == "paid"

    ping = cli(net, "alice", "ping")
    assert ping.returncode == 0
    assert "router link ok" in ping.stdout


def wait_for_status(net: Network, who: str, tx_id: str, state: str,
                    seconds: float = 20) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + seconds
    while True:
        proc = cli(net, who, "status", tx_id, "--json")
        if (proc.stdout and as_json(proc).get("state") == state) or time.monotonic() > deadline:
            return proc
        time.sleep(0.2)


@needs_network
def test_status_exit_codes_follow_the_payments_state(net: Network) -> None:
    """paid 0, failed 1, pending 4, unknown 5; with --json the same codes and `state`."""
    assert cli(net, "alice", "send", "bob", "1.00", "--tx-id", "st-paid").returncode == 0
    paid = cli(net, "alice", "status", "st-paid")
    assert paid.returncode == 0, paid.stderr
    assert paid.stdout.startswith("st-paid: paid (seq ")
    doc = cli(net, "alice", "status", "st-paid", "--json")
    assert doc.returncode == 0
    assert as_json(doc)["state"] == "paid"
    assert as_json(doc)["seq"] == 3  # two openings (carol's is zero), then this one
    received = cli(net, "bob", "status", "st-paid", "--from", "alice", "--json")
    assert (received.returncode, as_json(received)["state"]) == (0, "paid")

    assert cli(net, "alice", "send", "carol", "10.01", "--tx-id", "st-failed").returncode == 1
    failed = cli(net, "alice", "status", "st-failed")
    assert failed.returncode == 1
    assert "st-failed: failed (receiver_rejected)" in failed.stdout
    doc = cli(net, "alice", "status", "st-failed", "--json")
    assert doc.returncode == 1
    assert (as_json(doc)["state"], as_json(doc)["code"]) == ("failed", "receiver_rejected")

    never = cli(net, "alice", "status", "never-sent")
    assert never.returncode == 5
    assert "never-sent: unknown (the router has no record of it)" in never.stdout
    doc = cli(net, "alice", "status", "never-sent", "--json")
    assert doc.returncode == 5
    assert as_json(doc) == {"tx_id": "never-sent", "state": "unknown", "code": None,
                            "seq": None, "sender": None, "receiver": None, "amount": None,
                            "amount_minor": None, "detail": None}
    # bob did not send st-paid (alice did): without --from it is not his, so unknown
    assert cli(net, "bob", "status", "st-paid").returncode == 5
    assert cli(net, "carol", "status", "st-paid", "--from", "alice").returncode == 5

    # pending: the router holds the payment until the (stopped) ledger has written it
    net.procs["ledger"].pause()
    sender = subprocess.Popen(
        [sys.executable, "-m", "payer_client", "send", "bob", "2.00", "--tx-id", "st-wait",
         "--config", str(net.config_path), "--id", "alice"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=net.env())
    try:
        pending = wait_for_status(net, "alice", "st-wait", "pending")
        assert pending.returncode == 4, pending.stdout + pending.stderr
        assert as_json(pending)["state"] == "pending"
        human = cli(net, "alice", "status", "st-wait")
        assert human.returncode == 4
        assert "st-wait: pending (not decided yet" in human.stdout
    finally:
        net.procs["ledger"].resume()
        sender.communicate(timeout=60)
    done = wait_for_status(net, "alice", "st-wait", "paid")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_network
@pytest.mark.parametrize(
    ("who", "args", "code"),
    [
        ("carol", ["alice", "1.00"], "insufficient_funds"),
        ("alice", ["mallory", "1.00"], "unknown_receiver"),
        ("alice", ["carol", "10.01"], "receiver_rejected"),
    ],
)
def test_refused_payments_exit_1_with_code(net: Network, who: str, args: list[str],
                                           code: str) -> None:
    before = ledger_rows(net)
    human = cli(net, who, "send", *args)
    assert human.returncode == 1
    assert code in human.stderr
    doc = as_json(cli(net, who, "send", *args, "--json"))
    assert doc["outcome"] == "failed"
    assert doc["code"] == code
    assert ledger_rows(net) == before


@needs_network
def test_tx_id_conflict_and_unreachable(net: Network) -> None:
    assert cli(net, "alice", "send", "bob", "1.00", "--tx-id", "dup").returncode == 0
    conflict = cli(net, "alice", "send", "bob", "2.00", "--tx-id", "dup", "--json")
    assert conflict.returncode == 1
    assert as_json(conflict)["code"] == "tx_id_conflict"
    net.procs["bob"].stop()
    gone = cli(net, "alice", "send", "bob", "1.00", "--json")
    assert gone.returncode == 1
    assert as_json(gone)["code"] == "receiver_unreachable"


@needs_network
def test_watch_streams_offer_and_settled(net: Network) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "payer_client", "watch", "--json", "--config",
         str(net.config_path), "--id", "bob"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=net.env())
    try:
        time.sleep(1.0)  # let it subscribe
        assert cli(net, "alice", "send", "bob", "3.00", "--tx-id", "w-1").returncode == 0
        assert watch.stdout is not None
        kinds = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "settled" not in kinds:
            event = json.loads(watch.stdout.readline())
            assert event["tx_id"] == "w-1"
            kinds.append(event["kind"])
        assert kinds == ["offer", "settled"]
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0


@needs_network
def test_daemon_lifecycle_socket_and_second_daemon(net: Network) -> None:
    path = net.config.control_socket("alice")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    second = subprocess.run(
        [sys.executable, "-m", "payer_client", "run", "--config", str(net.config_path),
         "--id", "alice"], capture_output=True, text=True, env=net.env(), timeout=30,
        check=False)
    assert second.returncode == 2
    assert "already serves" in second.stderr
    assert path.exists()  # the refused daemon left the live one's socket alone
    assert cli(net, "alice", "balance").returncode == 0
    assert net.procs["alice"].stop() == 0
    assert not path.exists()
    # a stale socket file (daemon killed) is replaced on the next start
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    net.start_payer("alice")
    assert cli(net, "alice", "balance").returncode == 0


def inspect(net: Network, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "inspect", "--config",
                           str(net.config_path), *args], capture_output=True, text=True,
                          env=net.env(), timeout=60, check=False)


@needs_network
def test_router_inspect_shows_the_operators_view(net: Network) -> None:
    assert cli(net, "alice", "send", "bob", "12.50", "--tx-id", "ins-1").returncode == 0
    assert cli(net, "carol", "send", "alice", "1.00").returncode == 1  # insufficient funds
    doc = as_json(inspect(net, "--json"))
    assert doc["ledger_connected"] is True
    assert doc["outcomes"] == {"paid": 1, "insufficient_funds": 1}
    link = doc["ledger_link"]
    assert isinstance(link, dict)
    assert link["connects"] >= 1
    assert link["rows_sent"] >= 3  # two openings (carol's is zero) and the payment
    assert link["in_doubt_now"] == 0
    assert doc["sessions"] == ["alice", "bob", "carol"]
    assert doc["in_flight"] == []
    assert doc["holds"] == {}
    balances = doc["balances"]
    assert isinstance(balances, dict)
    assert balances["alice"] == {"amount": "87.50", "amount_minor": 8750}
    assert balances["bob"] == {"amount": "17.50", "amount_minor": 1750}
    assert balances["_issuer"]["amount_minor"] == -10500
    text = inspect(net)
    assert text.returncode == 0, text.stderr
    assert "ledger: connected" in text.stdout
    assert "paid 1, insufficient_funds 1" in text.stdout
    assert "sessions: 3 live (alice, bob, carol)" in text.stdout


@needs_network
def test_a_second_router_for_the_same_network_refuses_to_start(net: Network) -> None:
    """It finds the live router's admin socket and stops before saying hello to the ledger
    (which would fence the live router's ledger session); the live router is untouched."""
    second = subprocess.run([sys.executable, "-m", "router", "--config", str(net.config_path),
                             "--port", "0"], capture_output=True, text=True, env=net.env(),
                            timeout=60, check=False)
    assert second.returncode == 1
    assert "another router already serves" in second.stderr
    assert cli(net, "alice", "send", "bob", "1.00").returncode == 0
    link = as_json(inspect(net, "--json"))["ledger_link"]
    assert isinstance(link, dict)
    assert link["connects"] == 1  # never fenced, never reconnected


# --- without a network ------------------------------------------------------------------


@pytest.fixture
def offline(network: Network) -> Network:
    network.participants.update({"alice": "100.00", "bob": "5.00"})
    network.write_config()
    return network


@pytest.mark.parametrize("amount", ["1.234", "-5", "1e3", "abc", "0", "", " 1", "1,00"])
def test_bad_amount_exits_2(offline: Network, amount: str) -> None:
    proc = cli(offline, "alice", "send", "bob", amount)
    assert proc.returncode == 2
    assert "amount" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["send", "b o b", "1.00"], "not a payer id"),
        (["send", "bob", "1.00", "--tx-id", "has space"], "not a tx_id"),
        (["status", "bad id!"], "not a tx_id"),
        (["history", "--limit", "0"], "--limit"),
        (["history", "--from-seq", str(2**70)], "--from-seq"),
    ],
)
def test_bad_arguments_exit_2(offline: Network, args: list[str], needle: str) -> None:
    proc = cli(offline, "alice", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_bad_id_and_config_exit_2(offline: Network, tmp_path: Path) -> None:
    proc = cli(offline, "zed", "balance")
    assert proc.returncode == 2
    assert "'zed' is not a participant" in proc.stderr
    proc = cli(offline, "_issuer", "balance")
    assert proc.returncode == 2
    missing = subprocess.run(
        [sys.executable, "-m", "payer_client", "balance", "--config", str(tmp_path / "nope"),
         "--id", "alice"], capture_output=True, text=True, env=offline.env(), check=False)
    assert missing.returncode == 2
    assert "cannot read config" in missing.stderr
    usage = subprocess.run([sys.executable, "-m", "payer_client", "frobnicate"],
                           capture_output=True, text=True, env=offline.env(), check=False)
    assert usage.returncode == 2


def test_no_daemon_exits_3_with_hint(offline: Network) -> None:
    proc = cli(offline, "alice", "send", "bob", "1.00")
    assert proc.returncode == 3
    assert "no payer daemon for alice" in proc.stderr
    assert "jackpay-payer run --config" in proc.stderr
    assert cli(offline, "alice", "balance").returncode == 3
    assert cli(offline, "alice", "status", "some-tx").returncode == 3
    assert cli(offline, "alice", "status", "some-tx", "--json").returncode == 3


class FakeDaemon:
    """Stands in for ControlClient: answers every request with `reply` (or raises it)."""

    reply: object = None
    asked: ClassVar[list[object]] = []

    def __init__(self, path: Path, payer_id: str, start_hint: str) -> None:
        self.payer_id = payer_id

    async def connect(self) -> None:
        pass

    async def request(self, msg: object, expect: type) -> object:
        FakeDaemon.asked.append(msg)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("state", "exit_code"),
    [("paid", 0), ("failed", 1), ("pending", 4), ("mixed", 4), ("unknown", 5)],
)
def test_status_exit_code_for_each_state(offline: Network, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], state: str,
                                         exit_code: int) -> None:
    """Every state the daemon can answer, in-process (a fake control client), including
    `mixed`: a deposit in the mixer, not yet paid out."""
    reply = StatusReply(re=1, tx_id="tx-9", state=state,
                        code="receiver_rejected" if state == "failed" else None,
                        seq=7 if state == "paid" else None)
    monkeypatch.setattr(cli_module, "ControlClient", FakeDaemon)
    monkeypatch.setattr(FakeDaemon, "reply", reply)
    argv = ["status", "tx-9", "--config", str(offline.config_path), "--id", "alice"]
    assert cli_module.main(argv) == exit_code
    out = capsys.readouterr().out
    assert out.startswith(f"tx-9: {state} (")
    assert cli_module.main([*argv, "--from", "bob", "--json"]) == exit_code
    doc = json.loads(capsys.readouterr().out)
    assert (doc["tx_id"], doc["state"]) == ("tx-9", state)
    assert FakeDaemon.asked[-1] == Status(id=0, tx_id="tx-9", sender="bob")


def test_status_request_refused_exits_1_without_a_state(
        offline: Network, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_module, "ControlClient", FakeDaemon)
    monkeypatch.setattr(FakeDaemon, "reply", RequestFailed(ErrorCode.ROUTER_UNAVAILABLE,
                                                           "no router link"))
    argv = ["status", "tx-9", "--config", str(offline.config_path), "--id", "alice", "--json"]
    assert cli_module.main(argv) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["outcome"] == "failed"
    assert doc["code"] == "router_unavailable"
    assert "state" not in doc


@pytest.mark.parametrize("as_json", [False, True])
def test_a_daemon_gone_mid_send_names_the_tx_id_to_ask_about(
        offline: Network, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    """The daemon had the payment and died before answering: it may be paid. The user
    needs its tx_id (picked by the CLI) to ask, or to send it again safely — a new `send`
    would pay twice."""
    monkeypatch.setattr(cli_module, "ControlClient", FakeDaemon)
    monkeypatch.setattr(FakeDaemon, "reply", ConnectionLost("control socket closed"))
    argv = ["send", "bob", "1.00", "--config", str(offline.config_path), "--id", "alice"]
    assert cli_module.main(argv + ["--json"] * as_json) == 4  # not decided, as far as we know
    sent = FakeDaemon.asked[-1]
    assert isinstance(sent, Send)
    out, err = capsys.readouterr()
    if as_json:
        doc = json.loads(out)
        assert (doc["outcome"], doc["tx_id"]) == ("unknown", sent.tx_id)
    else:
        assert f"tx_id {sent.tx_id} may or may not be paid" in err
        assert f"jackpay-payer status {sent.tx_id}" in err
        assert f"--tx-id {sent.tx_id}" in err


def test_an_interrupted_send_prints_its_tx_id(offline: Network,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C (or SIGTERM) while the daemon works on it: the daemon goes on, so the user
    gets the tx_id to ask about — not a traceback."""

    class Stuck(FakeDaemon):
        async def request(self, msg: object, expect: type) -> object:
            FakeDaemon.asked.append(msg)
            await asyncio.Event().wait()  # the answer never comes
            raise AssertionError("unreachable")

    send = Send(id=0, to="bob", amount=100, tx_id="t-ctrl-c")

    async def interrupt() -> None:
        task = asyncio.ensure_future(cli_module._do_send(Stuck(Path(), "alice", ""), send,
                                                         False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupt())
    err = capsys.readouterr().err
    assert "interrupted before the answer: tx_id t-ctrl-c may or may not be paid" in err
    assert "--tx-id t-ctrl-c" in err


def test_every_tx_state_has_a_status_exit_code() -> None:
    """A state added to common.messages.TxState needs its exit code (and README row)."""
    assert set(get_args(TxState)) <= set(cli_module.STATUS_EXIT)
    assert cli_module.STATUS_EXIT == {"paid": 0, "failed": 1, "pending": 4, "mixed": 4,
                                      "unknown": 5}
    assert cli_module.status_exit_code("something-new") == 1


def test_help_documents_exit_codes() -> None:
    proc = subprocess.run([sys.executable, "-m", "payer_client", "send", "--help"],
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0
    assert "3  the payer daemon is not reachable" in proc.stdout
    status = subprocess.run([sys.executable, "-m", "payer_client", "status", "--help"],
                            capture_output=True, text=True, check=False,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert "4  status: pending" in status.stdout
    assert "5  status: unknown" in status.stdout


@needs_network
@pytest.mark.slow
def test_scripts_demo_end_to_end(tmp_path: Path) -> None:
    before = plant_decoys(tmp_path)  # run from a folder of the user's, left as it was
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "demo")], capture_output=True,
                          text=True, timeout=110, check=False, cwd=tmp_path, env=script_env())
    assert {p.name for p in tmp_path.iterdir()} == before
    failed = proc.stdout[proc.stdout.find("demo FAILED"):] if "demo FAILED" in proc.stdout else ""
    assert proc.returncode == 0, failed + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo OK" in proc.stdout
    # Every failure path a payment can take, each with no money moved, then reconcile.
    for code in ("insufficient_funds", "unknown_receiver", "receiver_rejected",
                 "receiver_unreachable", "tx_id_conflict", "receiver_timeout",
                 "ledger_unavailable", "ledger_write_failed"):
        assert f"→ {code}" in proc.stdout, code
    assert proc.stdout.count("no money moved") == 3
    assert "OK: balances, holds and the issued total agree with the ledger" in proc.stdout


def test_router_refuses_an_out_of_range_port(offline: Network) -> None:
    proc = subprocess.run([sys.executable, "-m", "router", "--config", str(offline.config_path),
                           "--port", "70000"], capture_output=True, text=True, timeout=30,
                          env=offline.env())
    assert proc.returncode == 2
    assert "out of range" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_network
def test_router_names_the_setting_when_it_cannot_listen(network: Network) -> None:
    """Its port taken: exit 1, the log names `[router] host and port` (it said only
    "Address already in use")."""
    network.write_config()
    network.start_ledger()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "router", "--config",
                               str(network.config_path), "--port", str(port)],
                              capture_output=True, text=True, timeout=60, env=network.env())
    assert proc.returncode == 1
    assert f"cannot listen for payers on 127.0.0.1:{port} ([router] host and port)" in (
        proc.stdout + proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr


def test_router_inspect_without_a_router_exits_1_with_a_hint(offline: Network) -> None:
    proc = inspect(offline)
    assert proc.returncode == 1
    assert "is the router running?" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = inspect(offline, "--admin")  # the option needs a path
    assert bad.returncode == 2


@needs_network
def test_router_inspect_reads_a_reply_larger_than_a_payer_frame(network: Network) -> None:
    # ids of 64 characters (the longest allowed): ~85 KiB of balances in one `inspect_ok`
    # frame, more than a payer frame's 64 KiB
    prefix = "participant-with-an-id-as-long-as-ids-may-be-"
    network.participants.update({f"{prefix}{i:019d}": "1.00" for i in range(1200)})
    network.write_config()
    network.start_ledger()
    network.start_router()
    proc = subprocess.run([sys.executable, "-m", "router", "inspect", "--json", "--admin",
                           network.admin_path], capture_output=True, text=True,
                          env=network.env(), timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) > 64 * 1024
    balances = as_json(proc)["balances"]
    assert isinstance(balances, dict)
    assert len(balances) == 1201  # every payer and `_issuer`
