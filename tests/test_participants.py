"""Participants at run time: `jackpay-router participants add|suspend|resume|list` and
`reload` (and SIGHUP) on a real network — and the pure parts (the participants file, the
reload plan, the settings that need a restart)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from netkit import REPO_ROOT, Network
from paykit import eventually

from common.config import load_config, parse_config
from common.errors import ConfigError, RequestFailed
from common.keys import public_pem
from common.messages import AddParticipant, Offer, ParticipantInfo
from common.participants import Participant, ParticipantChanges, load_changes, merge
from router import participants_cli
from router.participants import plan_reload, settings_changed


def operator(net: Network, *args: str) -> subprocess.CompletedProcess[str]:
    """`jackpay-router ARGS --config CONFIG`, as an operator types it."""
    return subprocess.run([sys.executable, "-m", "router", *args, "--config",
                           str(net.config_path)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=net.env(), timeout=60)


async def op(net: Network, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(operator, net, *args)


async def listing(net: Network) -> dict[str, dict[str, object]]:
    done = await op(net, "participants", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {p["id"]: p for p in json.loads(done.stdout)["participants"]}


def opening_rows(net: Network, payer_id: str) -> int:
    with net.ledger_path.open(newline="") as f:
        return sum(1 for r in csv.DictReader(f) if r["tx_id"] == f"_open:{payer_id}")


def up(tmp_path: Path, **participants: str) -> Network:
    net = Network(tmp_path, participants=participants)
    net.start_ledger()
    net.start_router()
    return net


# --- on a running network --------------------------------------------------------------


async def test_a_participant_added_at_run_time_pays_at_once_and_survives_a_restart(
        tmp_path: Path) -> None:
    net = up(tmp_path, alice="100.00", bob="5.00")
    try:
        # dave keeps his private key; the operator gets only the public half.
        key = Ed25519PrivateKey.generate()
        private = net.keys.payer_private("dave")
        private.parent.mkdir(parents=True, exist_ok=True)
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        pub = tmp_path / "dave.pub"
        pub.write_bytes(public_pem(key.public_key()))
        added = await op(net, "participants", "add", "dave", "--name", "Dave Jones",
                         "--opening-balance", "20.00", "--key", str(pub))
        assert added.returncode == 0, added.stderr
        assert "dave" in added.stdout
        assert "20.00" in added.stdout
        async with net.client("dave") as dave, net.client("alice") as alice:
            assert (await dave.query_balance()).balance == 2000
            await dave.send_payment("alice", 500, tx_id="d-1")
            await alice.send_payment("dave", 100, tx_id="a-1")
        again = await op(net, "participants", "add", "dave")
        assert again.returncode == 1
        assert "already a participant" in again.stderr
        # Every tool reading the config sees dave now.
        assert load_config(net.config_path).participant("dave").name == "Dave Jones"

        net.procs["router"].stop()
        net.restart("router")
        state = await listing(net)
        assert state["dave"]["balance"] == 1600
        assert state["dave"]["added_at_run_time"]
        assert state["dave"]["has_key"]
        assert not state["dave"]["suspended"]
        async with net.client("dave") as dave, net.client("bob"):
            await dave.send_payment("bob", 100, tx_id="d-2")
        assert opening_rows(net, "dave") == 1  # issued once, not again at the restart
        assert (await net.wait_quiet()).balances["bob"] == 600
    finally:
        net.stop_all()
    # The add signed dave's opening with the issuer's key (here, as in a test network):
    # the whole ledger, his opening included, passes the signature audit.
    from ledger.verify import signature_audit, verify_file

    verdict = verify_file(net.ledger_path, signature_audit(str(net.config_path)))
    assert verdict.ok, verdict.line
    assert "3 openings signed by the issuer" in verdict.line


async def test_an_addition_that_cannot_be_recorded_changes_nothing(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "10.00"})
    net.start_ledger()  # (it writes the config: the line below goes in after)
    text = net.config_path.read_text().replace(
        'id = "testnet"', 'id = "testnet"\nparticipants_file = "state/participants.json"')
    net.config_path.write_text(text)
    net.start_router()
    try:
        (net.root / "state").write_text("a file where the folder should be")
        key = Ed25519PrivateKey.generate()
        pub = tmp_path / "dave.pub"
        pub.write_bytes(public_pem(key.public_key()))
        refused = await op(net, "participants", "add", "dave", "--opening-balance", "1.00",
                           "--key", str(pub))
        assert refused.returncode == 1
        assert "cannot record the change" in refused.stderr
        (net.root / "state").unlink()
        assert not net.keys.payer_public("dave").exists()  # its key file was taken back
        assert "dave" not in await listing(net)
        assert "dave" not in (await net.inspect()).balances
    finally:
        net.stop_all()


async def test_added_without_a_key_it_logs_in_once_jackpay_keys_made_one(tmp_path: Path) -> None:
    net = up(tmp_path, alice="10.00")
    try:
        added = await op(net, "participants", "add", "erin", "--kind", "software")
        assert added.returncode == 0, added.stderr
        assert "jackpay-keys" in added.stdout  # the note says how to make its key
        assert (await listing(net))["erin"]["has_key"] is False
        keys = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "common.keygen", str(net.config_path)],
            capture_output=True, text=True, cwd=REPO_ROOT, env=net.env(), timeout=60)
        assert keys.returncode == 0, keys.stderr
        async with net.client("alice") as alice, net.client("erin") as erin:
            await alice.send_payment("erin", 250, tx_id="a-1")
            assert (await erin.query_balance()).balance == 250
    finally:
        net.stop_all()


async def test_a_suspended_participant_gets_a_clear_code_and_keeps_its_balance(
        tmp_path: Path) -> None:
    net = up(tmp_path, alice="10.00", bob="5.00")
    try:
        bob = net.client("bob")
        await bob.connect()
        async with net.client("alice") as alice:
            before = await alice.send_payment("bob", 100, tx_id="before")
        net.participants["carl"] = "1.00"  # a daemon, to see what its user is told
        net.write_config(ledger_port=net.procs["ledger"].addr[1])
        assert (await op(net, "reload")).returncode == 0
        net.start_payer("carl")
        for who in ("bob", "carl"):
            done = await op(net, "participants", "suspend", who)
            assert done.returncode == 0, done.stderr
        for _ in range(50):  # the daemon logs in again and is refused
            sent = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "payer_client", "send", "alice", "0.10", "--config",
                str(net.config_path), "--id", "carl"], capture_output=True, text=True,
                cwd=REPO_ROOT, env=net.env(), timeout=60)
            if "router_unavailable" not in sent.stdout + sent.stderr:
                break
        assert sent.returncode == 1
        assert "participant_suspended" in sent.stdout + sent.stderr
        done = await op(net, "participants", "suspend", "bob")
        assert done.returncode == 0, done.stderr
        assert "already suspended" in done.stdout
        await eventually(lambda: not bob.connected)  # its session is closed
        await bob.close()
        with pytest.raises(RequestFailed) as refused:
            await net.client("bob").connect()
        assert refused.value.code == "participant_suspended"
        async with net.client("alice") as alice:
            with pytest.raises(RequestFailed) as failed:
                await alice.send_payment("bob", 100, tx_id="a-1")
            assert failed.value.code == "participant_suspended"
            assert not failed.value.retriable
            # A payment made before the suspension keeps its outcome when retried.
            again = await alice.send_payment("bob", 100, tx_id="before")
            assert again.seq == before.seq
        state = await net.wait_quiet()
        assert state.balances["bob"] == 600
        assert state.balances["alice"] == 900
        assert state.holds == {}

        net.procs["router"].stop()  # suspended across a restart too
        net.restart("router")
        assert (await listing(net))["bob"]["suspended"] is True
        assert (await op(net, "participants", "resume", "bob")).returncode == 0
        async with net.client("alice") as alice, net.client("bob"):
            await alice.send_payment("bob", 100, tx_id="a-2")
        unknown = await op(net, "participants", "suspend", "mallory")
        assert unknown.returncode == 1
        assert "not a participant" in unknown.stderr
    finally:
        net.stop_all()


async def test_reload_adds_participants_and_keeps_payments_in_flight(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "10.00", "bob": "5.00"},
                  router_settings={"offer_timeout_s": 20.0})
    net.start_ledger()
    net.start_router()
    ledger_port = net.procs["ledger"].addr[1]
    try:
        release = asyncio.Event()
        offered = asyncio.Event()

        async def slowly(offer: Offer) -> None:
            offered.set()
            await release.wait()

        async with net.client("alice") as alice, net.client("bob", on_offer=slowly):
            paying = asyncio.create_task(alice.send_payment("bob", 300, tx_id="a-1"))
            await asyncio.wait_for(offered.wait(), 10)
            net.participants["frank"] = "7.00"
            net.write_config(ledger_port=ledger_port)  # also makes frank's keys
            reloaded = await op(net, "reload")
            assert reloaded.returncode == 0, reloaded.stderr
            assert "added: frank" in reloaded.stdout
            release.set()
            paid = await asyncio.wait_for(paying, 10)  # the payment in flight went on
            assert paid.seq > 0
            async with net.client("frank") as frank:
                await frank.send_payment("alice", 200, tx_id="f-1")

        # SIGHUP does the same; a config that does not parse changes nothing.
        net.participants["gina"] = "1.00"
        net.write_config(ledger_port=ledger_port)
        os.kill(net.procs["router"].pid, signal.SIGHUP)
        for _ in range(100):
            if "gina" in await listing(net):
                break
            await asyncio.sleep(0.1)
        assert "gina" in await listing(net)
        net.config_path.write_text(net.config_path.read_text() + "\n[[participants]]\nid = 3\n")
        typo = await op(net, "reload")  # the CLI reads the config first: it names the key
        assert typo.returncode == 2
        assert "participants[4].id" in typo.stderr
        bad = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "router", "reload", "--admin", net.admin_path],
            capture_output=True, text=True, cwd=REPO_ROOT, env=net.env(), timeout=60)
        assert bad.returncode == 1
        assert "nothing reloaded" in bad.stderr
        # Saved in Latin-1: refused the same way (it was a traceback in the router's log
        # and 15 s of silence for the CLI).
        net.config_path.write_bytes(net.config_path.read_bytes().replace(
            b'id = 3', b'id = "zo\xe9"'))
        bad = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "router", "reload", "--admin", net.admin_path],
            capture_output=True, text=True, cwd=REPO_ROOT, env=net.env(), timeout=60)
        assert bad.returncode == 1
        assert "not UTF-8" in bad.stderr
        assert "nothing reloaded" in bad.stderr
        net.write_config(ledger_port=ledger_port)
        assert set(await listing(net)) == {"alice", "bob", "frank", "gina"}
        state = await net.wait_quiet()
        assert state.balances["gina"] == 100
        assert state.balances["bob"] == 800
    finally:
        net.stop_all()


# --- the pure parts ------------------------------------------------------------------


def test_the_participants_file_is_merged_and_its_garbage_is_named(tmp_path: Path) -> None:
    cfg = parse_config('[network]\nid = "n"\n[[participants]]\nid = "alice"\n'
                       'opening_balance = "1.00"\n')
    changes = ParticipantChanges(added=[Participant(id="dave", opening_balance="2.00"),
                                        Participant(id="alice", name="not this one")],
                                 suspended=["alice", "nobody"])
    merged = merge(cfg.participants, changes)
    assert [(p.id, p.name, p.suspended) for p in merged] == [("alice", "", True),
                                                             ("dave", "", False)]
    bad = tmp_path / "participants.json"
    for garbage in (b"{not json", b'{"added": [{"id": "_issuer"}]}',
                    b'{"added": [{"id": "d"}, {"id": "d"}]}', b'{"format": "v9"}'):
        bad.write_bytes(garbage)
        with pytest.raises(ConfigError, match=r"participants\.json"):
            load_changes(bad)
    assert load_changes(tmp_path / "absent.json") == ParticipantChanges()


def test_reload_plan_and_the_settings_that_need_a_restart() -> None:
    a, b = Participant(id="a"), Participant(id="b")
    plan = plan_reload([a, b], [msgspec.structs.replace(b, suspended=True), Participant(id="c")])
    assert ([p.id for p in plan.added], plan.removed, [p.id for p in plan.changed]) == (
        ["c"], ["a"], ["b"])
    old = parse_config('[network]\nid = "n"\n[router]\nport = 1\n')
    new = parse_config('[network]\nid = "n"\n[router]\nport = 2\n[[participants]]\nid = "x"\n')
    assert settings_changed(old, new) == ["[router] port"]


def test_the_cli_checks_its_arguments_and_says_when_no_router_answers(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "1.00"})
    bad_id = operator(net, "participants", "add", "_mint")
    assert bad_id.returncode == 2
    assert "not a valid participant id" in bad_id.stderr
    bad_amount = operator(net, "participants", "add", "dave", "--opening-balance", "1.234")
    assert bad_amount.returncode == 2
    bad_key = tmp_path / "k.pub"
    bad_key.write_text("not a key")
    assert operator(net, "participants", "add", "dave", "--key", str(bad_key)).returncode == 2
    # A name is printed by `participants list`: a newline would forge a row, ESC drive the
    # terminal, a bidi override reorder it. A new one is refused here and by the admin
    # socket; one already in a config or participants file (an older release took any)
    # still loads — the network must start — and is printed escaped.
    for name in ("evil\nname", "red\x1b[31m", "c1\x9bcsi", "rtl\u202eevil", "ls\u2028x"):
        bad_name = operator(net, "participants", "add", "dave", "--name", name)
        assert bad_name.returncode == 2
        assert "--name" in bad_name.stderr
        with pytest.raises(msgspec.ValidationError, match=r"\$\.name"):
            msgspec.msgpack.decode(msgspec.msgpack.encode(
                {"t": "participant_add", "id": 1, "payer": "dave", "name": name}),
                type=AddParticipant)
    old = parse_config('[network]\nid = "n"\n[[participants]]\nid = "x"\n'
                       'name = "a\\tb\\u001b[31m\\u202e"\n')
    info = ParticipantInfo(id="x", name=old.participants[0].name, kind="individual",
                           opening_balance=0, max_incoming=None, suspended=False,
                           added_at_run_time=False, has_key=True, online=False, balance=0,
                           available=0)
    assert "a\\x09b\\x1b[31m\\u202e" in participants_cli._row(info)
    down = operator(net, "participants", "list")
    assert down.returncode == 3
    assert "is the router running?" in down.stderr


async def test_a_refused_addition_leaves_the_signed_opening_as_it_was(tmp_path: Path) -> None:
    """carol is added while the ledger is away (her opening waits), then added again with
    another opening balance: refused — and the issuer's signed openings keep hers as it
    was. (They were rewritten before the router refused: her opening could then never be
    issued, and the router refused its next start.)"""
    net = up(tmp_path, alice="10.00")
    try:
        net.procs["ledger"].kill()
        net.procs["ledger"].wait(10)
        added = await op(net, "participants", "add", "carol", "--opening-balance", "1.00")
        assert added.returncode == 0, added.stderr
        again = await op(net, "participants", "add", "carol", "--opening-balance", "5.00")
        assert again.returncode != 0
        assert "already" in again.stderr
        from common.signing import read_openings

        assert read_openings(net.keys.openings)["carol"][0] == 100
        net.restart("ledger")
        for _ in range(200):
            if (await net.inspect()).balances.get("carol") == 100:
                break
            await asyncio.sleep(0.05)
        assert (await net.inspect()).balances.get("carol") == 100
        net.procs["router"].stop()
        net.restart("router")  # starts: the opening it finds signed is the one issued
        assert (await net.inspect()).balances.get("carol") == 100
        assert opening_rows(net, "carol") == 1
    finally:
        net.stop_all()


async def test_an_addition_the_router_refuses_takes_its_signed_opening_back(
        tmp_path: Path) -> None:
    """bob is a participant (with no opening): `add bob --opening-balance 5.00` signs
    the opening, then the router refuses (already a participant) — and the signature is
    taken back, so it cannot stand in the way of a later addition with another amount."""
    from common.signing import read_openings

    net = up(tmp_path, alice="10.00", bob="0.00")
    try:
        assert "bob" not in read_openings(net.keys.openings)
        refused = await op(net, "participants", "add", "bob", "--opening-balance", "5.00")
        assert refused.returncode == 1
        assert "already" in refused.stderr
        assert "bob" not in read_openings(net.keys.openings)
        assert "alice" in read_openings(net.keys.openings)  # the others' stay
    finally:
        net.stop_all()


async def test_an_admin_request_that_fails_unexpectedly_is_answered(tmp_path: Path) -> None:
    """A bug inside `reload` or `participant_add` (anything but a refusal): the operator
    gets `internal_error` naming it, at once — not a CLI waiting out its timeout — and the
    admin socket serves the next request."""
    from types import SimpleNamespace

    from common.messages import Ping, Pong, Reload
    from router.admin import AdminServer
    from router.inspect_cli import ask

    class BrokenOps:
        async def reload(self, rid: int) -> None:
            raise RuntimeError("a bug")

    path = tmp_path / "admin.sock"
    admin = AdminServer(SimpleNamespace(participant_ops=BrokenOps()), path)  # type: ignore[arg-type]
    await admin.start()
    try:
        with pytest.raises(RequestFailed) as failed:
            await ask(str(path), Reload(id=0), 5.0, refusals=True)
        assert failed.value.code == "internal_error"
        assert "RuntimeError: a bug" in failed.value.message
        assert isinstance(await ask(str(path), Ping(id=0), 5.0), Pong)
    finally:
        await admin.aclose()
