"""jackpay-keys (common.keygen): files and modes, certificates that really work in a TLS
handshake, idempotent reruns, renew, rotate, and the CLI's exit codes and messages."""

from __future__ import annotations

import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import NetworkConfig, load_config
from common.keygen import ensure_keys, main, renew, rotate
from common.keys import KeyFileError, KeyStore, load_public_key, public_pem, raw_public

TOML = ('[network]\nid = "testnet"\n\n[[participants]]\nid = "alice"\nopening_balance = "10.00"\n'
        '\n[[participants]]\nid = "bob"\n')
PRIVATE = ["ca.key", "router.key", "ledger.key", "router-client.key", "auditor.key",
           "payers/alice.key", "payers/bob.key", "issuer.key", "pool-signer.key",
           "ledger-signer.key"]
PUBLIC = ["ca.crt", "router.crt", "ledger.crt", "router-client.crt", "auditor.crt",
          "payers/alice.pub", "payers/bob.pub", "issuer.pub", "pool-signer.pub",
          "ledger-signer.pub", "openings.json"]


@pytest.fixture
def cfg_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "net.toml"
    path.write_text(TOML)
    return path


@pytest.fixture
def cfg(cfg_path: Path) -> NetworkConfig:
    return load_config(cfg_path)


@pytest.fixture
def store(cfg: NetworkConfig) -> KeyStore:
    ensure_keys(cfg)
    return KeyStore.for_config(cfg)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def pub_bytes(c: x509.Certificate) -> bytes:
    return c.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              hostname: str) -> ssl.SSLObject:
    """A TLS handshake over memory buffers; returns the server side. Raises ssl.SSLError."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, obj, out, peer_in in (("client", client, c_out, s_in),
                                        ("server", server, s_out, c_in)):
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if all(done.values()):
            # TLS 1.3: the server's verdict on a client certificate reaches the client
            # only with the next record, so exchange one byte each way.
            client.write(b"x")
            s_in.write(c_out.read())
            assert server.read(1) == b"x"
            return server
    raise AssertionError("handshake did not finish")


def server_ctx(store: KeyStore, name: str, client_certs: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(store.cert(name), store.key(name))
    if client_certs:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(store.ca_cert)
    return ctx


def client_ctx(store: KeyStore, identity: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(store.ca_cert)
    if identity is not None:
        ctx.load_cert_chain(store.cert(identity), store.key(identity))
    return ctx


def test_creates_every_file_with_modes_and_a_rerun_changes_nothing(cfg: NetworkConfig) -> None:
    lines = ensure_keys(cfg)
    root = cfg.keys_dir
    assert len(lines) == len(PRIVATE) + len(PUBLIC)
    assert "created keys/private/payers/alice.key (0600)" in lines
    for name in PRIVATE:
        assert mode(root / "private" / name) == 0o600, name
    for name in PUBLIC:
        assert mode(root / "public" / name) == 0o644, name
    assert mode(root / "private") == 0o700
    assert mode(root / "private" / "payers") == 0o700
    before = snapshot(root)
    assert sorted(before) == sorted([f"private/{n}" for n in PRIVATE]
                                    + [f"public/{n}" for n in PUBLIC])  # no temp files left
    assert ensure_keys(cfg) == []
    assert snapshot(root) == before


def test_public_files_are_0644_and_keys_0600_whatever_the_umask(cfg: NetworkConfig) -> None:
    old = os.umask(0o077)
    try:
        ensure_keys(cfg)
    finally:
        os.umask(old)
    assert mode(cfg.keys_dir / "public" / "router.crt") == 0o644
    assert mode(cfg.keys_dir / "private" / "router.key") == 0o600


def test_key_folders_are_never_writable_by_others_whatever_the_umask(
        cfg: NetworkConfig) -> None:
    """The router refuses key folders others may write (they could swap a payer's key):
    jackpay-keys must not make one, even under umask 000."""
    old = os.umask(0)
    try:
        ensure_keys(cfg)
    finally:
        os.umask(old)
    store = KeyStore.for_config(cfg)
    assert store.unsafe_public_folder() is None
    for folder in (store.root, store.public_dir, store.payers_public_dir):
        assert not mode(folder) & 0o022, (folder, oct(mode(folder)))


def test_certificates_are_signed_by_the_ca_with_the_right_names(store: KeyStore) -> None:
    ca = cert(store.ca_cert)
    assert ca.subject.rfc4514_string() == "CN=JackPay CA testnet"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    for name, eku in [("router", ExtendedKeyUsageOID.SERVER_AUTH),
                      ("ledger", ExtendedKeyUsageOID.SERVER_AUTH),
                      ("router-client", ExtendedKeyUsageOID.CLIENT_AUTH),
                      ("auditor", ExtendedKeyUsageOID.CLIENT_AUTH)]:
        leaf = cert(store.cert(name))
        leaf.verify_directly_issued_by(ca)
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.not_valid_before_utc < datetime.now(UTC) - timedelta(minutes=4)
    san = cert(store.cert("router")).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["router.testnet"]
    cn = cert(store.cert("router-client")).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn[0].value == "router"


def test_tls_handshake_checks_the_server_name(store: KeyStore) -> None:
    handshake(server_ctx(store, "router"), client_ctx(store), "router.testnet")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server_ctx(store, "router"), client_ctx(store), "router.othernet")
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        handshake(server_ctx(store, "auditor"), client_ctx(store), "auditor")  # client cert


def test_mutual_tls_identities_and_usages(store: KeyStore) -> None:
    for identity, cn in [("router-client", "router"), ("auditor", "auditor")]:
        server = handshake(server_ctx(store, "ledger", client_certs=True),
                           client_ctx(store, identity), "ledger.testnet")
        peer = server.getpeercert()
        assert peer is not None
        assert dict(rdn[0] for rdn in peer["subject"])["commonName"] == cn
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        handshake(server_ctx(store, "ledger", client_certs=True),  # a server cert as client
                  client_ctx(store, "router"), "ledger.testnet")


def test_a_new_participant_gets_keys_and_nothing_else_changes(cfg_path: Path,
                                                              store: KeyStore) -> None:
    before = snapshot(store.root)
    cfg_path.write_text(TOML + '\n[[participants]]\nid = "carol"\n')
    lines = ensure_keys(load_config(cfg_path))
    assert lines == ["created keys/private/payers/carol.key (0600)",
                     "created keys/public/payers/carol.pub (0644)"]
    after = snapshot(store.root)
    assert {k: v for k, v in after.items() if "carol" not in k} == before
    assert raw_public(store.load_payer_key("carol").public_key()) == raw_public(
        store.load_payer_public("carol"))


def test_a_missing_half_is_derived_from_the_key_that_is_there(cfg: NetworkConfig,
                                                              store: KeyStore) -> None:
    alice_pub = store.payer_public("alice").read_bytes()
    router_key = store.key("router").read_bytes()
    router_pub = pub_bytes(cert(store.cert("router")))
    store.payer_public("alice").unlink()
    store.cert("router").unlink()
    lines = ensure_keys(cfg)
    assert [ln.split(" (")[0] for ln in lines] == ["created keys/public/router.crt",
                                                   "created keys/public/payers/alice.pub"]
    assert store.payer_public("alice").read_bytes() == alice_pub
    assert store.key("router").read_bytes() == router_key
    assert pub_bytes(cert(store.cert("router"))) == router_pub


def test_a_too_open_key_is_refused(cfg_path: Path, store: KeyStore,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    store.payer_private("alice").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        store.load_payer_key("alice")
    store.ca_key.chmod(0o644)
    store.cert("router").unlink()
    capsys.readouterr()
    assert main([str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jackpay-keys: ")
    assert "chmod 600" in err
    assert "ca.key" in err
    assert not store.cert("router").exists()


def test_a_missing_ca_key_is_an_error_when_something_must_be_signed(
        cfg_path: Path, store: KeyStore, capsys: pytest.CaptureFixture[str]) -> None:
    store.ca_key.unlink()
    assert main([str(cfg_path)]) == 0  # nothing to sign: fine (the CA key kept offline)
    store.cert("ledger").unlink()
    store.key("ledger").unlink()
    capsys.readouterr()
    assert main([str(cfg_path)]) == 2
    assert "the CA key" in capsys.readouterr().err
    assert not store.key("ledger").exists()  # no key made for a cert that cannot be issued
    store.ca_cert.unlink()  # a new CA now would not vouch for the certificates still there
    assert main([str(cfg_path)]) == 2
    assert "the CA key" in capsys.readouterr().err
    assert not store.ca_key.exists()
    assert not store.ca_cert.exists()


def test_rotate_a_participant(cfg: NetworkConfig, store: KeyStore) -> None:
    before = snapshot(store.root)
    old_public = raw_public(store.load_payer_public("alice"))
    lines = rotate(cfg, ["alice"])
    assert lines == ["updated keys/public/payers/alice.retired.json (0644)",
                     "rotated keys/private/payers/alice.key (0600)",
                     "rotated keys/public/payers/alice.pub (0644)"]
    after = snapshot(store.root)
    changed = {k for k in after if after.get(k, (None,))[0] != before.get(k, (None,))[0]}
    assert changed == {"private/payers/alice.key", "public/payers/alice.pub",
                       "public/payers/alice.retired.json"}
    # the old public key is kept, with when it stopped: rows it signed still verify
    [(until, retired)] = store.load_payer_retired("alice")
    assert raw_public(retired) == old_public
    assert until.endswith("Z")
    assert raw_public(store.load_payer_key("alice").public_key()) == raw_public(
        store.load_payer_public("alice"))
    assert mode(store.payer_private("alice")) == 0o600


def test_many_rotations_keep_every_retired_key_readable(cfg: NetworkConfig,
                                                         store: KeyStore) -> None:
    """A key rotated every month for years: the history grows past the 4 KiB a single
    public key file may have, and every retired key still loads (`verify --keys` needs
    them all)."""
    for _ in range(40):
        rotate(cfg, ["alice"])
    assert store.payer_retired("alice").stat().st_size > 4096
    assert len(store.load_payer_retired("alice")) == 40


def test_a_damaged_key_history_stops_a_rotation_with_a_clear_error(
        cfg: NetworkConfig, store: KeyStore) -> None:
    from common.keys import KeyFileError

    store.payer_retired("alice").write_text("{not json")
    before = snapshot(store.root)
    with pytest.raises(KeyFileError, match=r"alice\.retired\.json"):
        rotate(cfg, ["alice"])
    assert snapshot(store.root) == before  # the key was not rotated without its history


def test_a_mismatched_pair_is_reported_not_papered_over(cfg: NetworkConfig,
                                                        store: KeyStore) -> None:
    """A --rotate cut off between its two writes leaves halves that do not match: the
    next run says so and how to repair it, and changes nothing."""
    other = Ed25519PrivateKey.generate().public_key()
    store.payer_public("bob").write_bytes(public_pem(other))
    before = snapshot(store.root)
    lines = ensure_keys(cfg)
    assert any("bob" in ln and "--rotate bob" in ln and ln.startswith("warning") for ln in lines)
    assert snapshot(store.root) == before


def test_rotate_a_tls_identity(cfg: NetworkConfig, store: KeyStore) -> None:
    old_key = store.key("router").read_bytes()
    old_cert = store.cert("router").read_bytes()
    ca = store.ca_cert.read_bytes()
    rotate(cfg, ["router"])
    assert store.key("router").read_bytes() != old_key
    assert store.cert("router").read_bytes() != old_cert
    assert store.ca_cert.read_bytes() == ca
    cert(store.cert("router")).verify_directly_issued_by(cert(store.ca_cert))
    handshake(server_ctx(store, "router"), client_ctx(store), "router.testnet")


@pytest.mark.parametrize("name", ["ca", "nobody"])
def test_rotate_ca_or_unknown_is_refused(cfg_path: Path, name: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(cfg_path), "--rotate", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jackpay-keys: --rotate {name}")
    assert "Traceback" not in err
    assert not (cfg_path.parent / "keys").exists()  # refused before anything was created


def test_renew_keeps_the_keys_and_only_touches_what_expires(cfg: NetworkConfig,
                                                            store: KeyStore) -> None:
    names = ["router", "ledger", "router-client", "auditor"]
    old = {n: cert(store.cert(n)) for n in names}
    ca_bytes = store.ca_cert.read_bytes()
    later = datetime.now(UTC) + timedelta(days=340)
    warnings = ensure_keys(cfg, now=later)
    assert len(warnings) == 4
    assert all("expires in" in w for w in warnings)
    assert renew(cfg, now=datetime.now(UTC)) == []  # nothing near expiry today
    lines = renew(cfg, within_days=30, now=later)
    assert [ln.split()[:2] for ln in lines] == [["renewed", f"keys/public/{n}.crt"]
                                                for n in names]
    assert store.ca_cert.read_bytes() == ca_bytes
    for n in names:
        new = cert(store.cert(n))
        assert pub_bytes(new) == pub_bytes(old[n])
        assert new.serial_number != old[n].serial_number
        assert new.not_valid_after_utc > later + timedelta(days=300)
        new.verify_directly_issued_by(cert(store.ca_cert))
    # Ten years on the CA itself is renewed: same key and subject, so old leaves still verify.
    old_ca = cert(store.ca_cert)
    leaf = cert(store.cert("router"))
    renew(cfg, now=datetime.now(UTC) + timedelta(days=3640))
    new_ca = cert(store.ca_cert)
    assert new_ca.serial_number != old_ca.serial_number
    assert pub_bytes(new_ca) == pub_bytes(old_ca)
    assert new_ca.subject == old_ca.subject
    leaf.verify_directly_issued_by(new_ca)


def test_main_prints_and_exits(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "created keys/private/payers/alice.key (0600)\n" in out
    assert main([str(cfg_path)]) == 0
    assert capsys.readouterr().out == "keys complete for network testnet in keys\n"
    assert main([str(cfg_path), "--days", "0"]) == 2
    assert main([str(cfg_path), "--bogus"]) == 2


@pytest.mark.parametrize("args", [["--days", "3000000"],
                                  ["--rotate", "router", "--days", "3000000"],
                                  ["--renew", "--renew-within-days", "999999999999"]])
def test_days_past_what_a_certificate_can_say_are_refused_before_anything_is_written(
        cfg_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Not an OverflowError, and not a half-made key folder."""
    assert main([str(cfg_path), *args]) == 2
    assert "36500" in capsys.readouterr().err
    assert not (cfg_path.parent / "keys").exists()


def test_bad_input_exits_2_without_a_traceback(cfg_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(cfg_path.parent / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jackpay-keys: cannot read config")
    assert "Traceback" not in err
    cfg_path.write_text("[network]\nid = 'Bad Id'\n")
    assert main([str(cfg_path)]) == 2
    assert "network id" in capsys.readouterr().err
    cfg_path.write_text(TOML)
    assert main([str(cfg_path)]) == 0
    (cfg_path.parent / "keys/public/router.crt").write_text("not a certificate\n")
    assert main([str(cfg_path)]) == 2
    assert "router.crt is not a PEM certificate" in capsys.readouterr().err


def test_list_creates_nothing_and_shows_what_is_missing(
        cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(cfg_path), "--list"]) == 0
    out = capsys.readouterr().out
    assert out.count("missing") >= 8
    assert "run `jackpay-keys CONFIG`" in out
    assert not (cfg_path.parent / "keys").exists()
    main([str(cfg_path)])
    capsys.readouterr()
    assert main([str(cfg_path), "--list"]) == 0
    out = capsys.readouterr().out
    store = KeyStore.for_config(load_config(cfg_path))
    alice = raw_public(load_public_key(store.payer_public("alice").read_bytes(), "alice"))
    assert alice.hex()[:16] in out
    assert "CN=router.testnet" in out
    assert "missing" not in out
    assert out.splitlines()[-1] == "keys complete for network testnet in keys"


def test_a_public_half_without_its_key_is_left_alone(cfg: NetworkConfig,
                                                     store: KeyStore) -> None:
    store.payer_private("bob").unlink()  # e.g. bob's key lives only on bob's host
    before = snapshot(store.root)
    assert ensure_keys(cfg) == [
        "note: keys/public/payers/bob.pub has no private key here "
        "(keys/private/payers/bob.key); left alone (`--rotate bob` makes a new pair)"]
    assert snapshot(store.root) == before


def test_creating_never_overwrites(cfg: NetworkConfig, store: KeyStore) -> None:
    from common.keygen import _Keys  # the writer itself: a file that appeared meanwhile wins
    before = store.key("router").read_bytes()
    with pytest.raises(FileExistsError):
        _Keys(cfg, 365, None, None).write(store.key("router"), b"other", "created")
    assert store.key("router").read_bytes() == before
    assert sorted(p.name for p in (store.root / "private").iterdir()) == sorted(
        [*(n for n in PRIVATE if "/" not in n), "payers"])  # no temp file left behind


def test_the_openings_are_signed_by_the_issuer_and_re_signed_when_changed(
        cfg_path: Path) -> None:
    from common.signing import PAY_TAG, read_openings, verify

    cfg = load_config(cfg_path)
    ensure_keys(cfg)
    store = KeyStore.for_config(cfg)
    issuer = store.load_signer_public("issuer")
    signed = read_openings(store.openings)
    assert set(signed) == {"alice"}  # bob opens with nothing: no row, nothing to sign
    amount, sig = signed["alice"]
    assert amount == 1000
    assert verify(issuer, sig, PAY_TAG, "testnet", "_issuer", "_open:alice", "alice", 1000,
                  "opening balance")
    cfg_path.write_text(TOML.replace('"10.00"', '"12.00"'))
    lines = ensure_keys(load_config(cfg_path))
    assert lines == ["signed keys/public/openings.json (0644)"]
    assert read_openings(store.openings)["alice"][0] == 1200
    # The issuer's key kept offline: nothing is signed, and it says so.
    store.key("issuer").rename(cfg_path.parent / "issuer.key.offline")
    cfg_path.write_text(TOML.replace('"10.00"', '"13.00"'))
    lines = ensure_keys(load_config(cfg_path))
    assert any("not signed: the issuer's private key is not here" in line for line in lines)
    assert read_openings(store.openings)["alice"][0] == 1200


def test_updates_of_the_signed_openings_wait_for_each_other(tmp_path: Path) -> None:
    """`jackpay-keys` and `participants add` both rewrite openings.json from what they
    read: under `common.files.updating` the second waits for the first to finish (a
    change is never written over)."""
    import threading

    from common.files import updating

    path = tmp_path / "openings.json"
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with updating(path):
            first_in.set()
            order.append("first in")
            threading.Event().wait(0.2)
            order.append("first out")

    def second() -> None:
        first_in.wait(5)
        with updating(path):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["first in", "first out", "second in"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock file left beside it
