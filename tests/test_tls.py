"""`TlsSession` (common.tls) is TLS over memory buffers: driven here by hand, no sockets —
bytes one at a time, a wrong name, another CA, a tampered record, a close_notify."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from common.keygen import ensure_keys
from common.keys import KeyFileError, KeyStore
from common.tls import TlsFailed, TlsSession, client_tls, server_context


def store_for(root: Path, network_id: str = "t") -> KeyStore:
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "network.toml"
    cfg_path.write_text(f'[network]\nid = "{network_id}"\n')
    cfg = load_config(cfg_path)
    ensure_keys(cfg)
    return KeyStore.for_config(cfg)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return store_for(tmp_path_factory.mktemp("keys"))


def pump(client: TlsSession, server: TlsSession, first: bytes, *, byte_at_a_time: bool = False
         ) -> tuple[bytes, bytes]:
    """Carry bytes both ways until both are quiet; returns the plaintext each received."""
    to_server, to_client = first, b""
    got_client, got_server = b"", b""
    for _ in range(50):
        if not to_server and not to_client:
            break
        if to_server:
            chunks = [to_server[i:i + 1] for i in range(len(to_server))] if byte_at_a_time \
                else [to_server]
            to_server = b""
            for c in chunks:
                plain, out, _ = server.receive(c)
                got_server += plain
                to_client += out
        if to_client:
            plain, out, _ = client.receive(to_client)
            to_client = b""
            got_client += plain
            to_server += out
    return got_client, got_server


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_handshake_and_data_both_ways(store: KeyStore, byte_at_a_time: bool) -> None:
    tls = client_tls(store, "router")
    client = TlsSession(tls.context, server_side=False, server_name=tls.server_name)
    server = TlsSession(server_context(store, "router"), server_side=True)
    pump(client, server, client.start(), byte_at_a_time=byte_at_a_time)
    assert client.handshake_done
    assert server.handshake_done
    _, got_server = pump(client, server, client.send(b"hello router" * 1000),
                                  byte_at_a_time=byte_at_a_time)
    assert got_server == b"hello router" * 1000
    assert server.peer_common_name() is None  # the router asks payers for no certificate
    plain, _, eof = client.receive(server.send(b"pong"))
    assert (plain, eof) == (b"pong", False)
    plain, _, eof = client.receive(server.close())
    assert (plain, eof) == (b"", True)


def test_mutual_tls_names_the_client(store: KeyStore) -> None:
    tls = client_tls(store, "ledger", identity="router-client")
    client = TlsSession(tls.context, server_side=False, server_name=tls.server_name)
    server = TlsSession(server_context(store, "ledger", client_certs=True), server_side=True)
    pump(client, server, client.start())
    assert server.handshake_done
    assert server.peer_common_name() == "router"


def test_no_client_certificate_fails_at_the_server(store: KeyStore) -> None:
    tls = client_tls(store, "ledger")
    client = TlsSession(tls.context, server_side=False, server_name=tls.server_name)
    server = TlsSession(server_context(store, "ledger", client_certs=True), server_side=True)
    with pytest.raises(TlsFailed, match="the client sent no certificate"):
        pump(client, server, client.start())


@pytest.mark.parametrize("name", ["ledger.t", "router.other"])
def test_a_certificate_for_another_name_is_refused(store: KeyStore, name: str) -> None:
    tls = client_tls(store, "router")
    client = TlsSession(tls.context, server_side=False, server_name=name)
    server = TlsSession(server_context(store, "router"), server_side=True)
    with pytest.raises(TlsFailed, match=f"expected {name}"):
        pump(client, server, client.start())


def test_a_server_from_another_ca_is_refused(store: KeyStore, tmp_path: Path) -> None:
    impostor = store_for(tmp_path / "impostor")  # same network id and names, its own CA
    tls = client_tls(store, "router")
    client = TlsSession(tls.context, server_side=False, server_name=tls.server_name)
    server = TlsSession(server_context(impostor, "router"), server_side=True)
    with pytest.raises(TlsFailed, match="certificate was refused"):
        pump(client, server, client.start())


def test_a_tampered_record_is_refused(store: KeyStore) -> None:
    tls = client_tls(store, "router")
    client = TlsSession(tls.context, server_side=False, server_name=tls.server_name)
    server = TlsSession(server_context(store, "router"), server_side=True)
    pump(client, server, client.start())
    record = bytearray(client.send(b"pay bob 1.00"))
    record[-1] ^= 1
    with pytest.raises(TlsFailed):
        server.receive(bytes(record))


def test_plaintext_is_not_tls(store: KeyStore) -> None:
    server = TlsSession(server_context(store, "router"), server_side=True)
    with pytest.raises(TlsFailed, match="not TLS"):
        server.receive(b"\x00\x00\x00\x10" + b"x" * 16)


@pytest.mark.parametrize("which", ["ca.crt", "router.crt"])
def test_a_folder_where_a_certificate_should_be_is_named(tmp_path: Path, which: str) -> None:
    """Not a traceback (IsADirectoryError): the file, and why it cannot be read."""
    store = store_for(tmp_path)
    cert = store.ca_cert if which == "ca.crt" else store.cert("router")
    cert.unlink()
    cert.mkdir()
    with pytest.raises(KeyFileError, match=rf"cannot read .*{which}.*Is a directory"):
        server_context(store, "router", client_certs=True)
