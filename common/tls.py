"""TLS 1.3 for every TCP link: the contexts, and a sans-I/O session over memory buffers.

`TlsSession` is TLS the h11 way: ciphertext goes in (`receive`), plaintext comes out, and
`send` returns the ciphertext to write instead of writing it. `common.aio.Channel` drives
one per connection on a plain transport, so the same code runs on asyncio's loop and on
uvloop, a connection can be refused (caps) before any TLS work is spent on it, and the
handshake shares the connection's one deadline with `hello` and `auth`.

Rules:
- TLS 1.3 only; clients verify the server's certificate against the network CA and its
  DNS name (`router.<network id>`); the ledger demands a client certificate from the same
  CA (mutual TLS). No session tickets, so no resumption and no 0-RTT data;
- any TLS failure raises TlsFailed (a ProtocolError: close the connection), whose
  message a person can act on; a certificate problem says which name or CA was expected;
- a peer's `close_notify` is an end of stream (`receive` returns `eof=True`).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError, ProtocolError
from common.keys import KeyFileError, KeyStore

# One read returns at most one record, whose plaintext is at most 16 KiB (TLS 1.3). A
# larger size would make the ssl module allocate (and glibc mmap) that much per read.
_READ_CHUNK = 16 * 1024
_WantRead = ssl.SSLWantReadError
_ZeroReturn = ssl.SSLZeroReturnError


class TlsFailed(ProtocolError):
    """The TLS handshake or a record failed; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client reaches a server over TLS: the context (network CA pinned, and a
    client certificate for the ledger) and the name the server's certificate must carry."""

    context: ssl.SSLContext
    server_name: str


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load_chain(ctx: ssl.SSLContext, store: KeyStore, name: str) -> None:
    cert = store.cert(name)
    key = store.private_key_path(name)  # refuses a missing or group/world-readable key
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError:
        raise KeyFileError(f"{cert} is missing; run `jackpay-keys CONFIG`") from None
    except ssl.SSLError as exc:
        raise KeyFileError(f"{cert} and {key} are not a usable certificate and key "
                           f"({exc.reason or exc}); run `jackpay-keys CONFIG`") from None
    except OSError as exc:  # a folder in its place, no permission
        raise KeyFileError(f"cannot read {cert} or {key}: {exc.strerror or exc}") from None


def _load_ca(ctx: ssl.SSLContext, store: KeyStore) -> None:
    try:
        ctx.load_verify_locations(cafile=store.ca_cert)
    except FileNotFoundError:
        raise KeyFileError(f"{store.ca_cert} is missing; run `jackpay-keys CONFIG`") from None
    except ssl.SSLError as exc:
        raise KeyFileError(f"{store.ca_cert} is not a CA certificate ({exc.reason or exc})"
                           ) from None
    except OSError as exc:  # a folder in its place, no permission
        raise KeyFileError(f"cannot read {store.ca_cert}: {exc.strerror or exc}") from None


def server_context(store: KeyStore, name: str, *, client_certs: bool = False) -> ssl.SSLContext:
    """A TLS server context for identity `name` ("router", "ledger"). With
    `client_certs`, a client must present a certificate signed by the network CA.
    Raises KeyFileError."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, store, name)
    ctx.num_tickets = 0  # no resumption, hence no 0-RTT
    if client_certs:
        ctx.verify_mode = ssl.CERT_REQUIRED
        _load_ca(ctx, store)
    return ctx


def client_tls(store: KeyStore, server: str, *, identity: str | None = None) -> ClientTls:
    """How to reach `server` ("router", "ledger"): the network CA pinned, the server's
    DNS name checked, and (for the ledger) the client certificate `identity`
    ("router-client", "auditor"). Raises KeyFileError."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _load_ca(ctx, store)
    if identity is not None:
        _load_chain(ctx, store, identity)
    return ClientTls(ctx, store.server_name(server))


# OpenSSL's reasons for the failures a server meets every day, in words.
_REASONS = {
    "WRONG_VERSION_NUMBER": "not TLS (plain TCP, or another protocol)",
    "HTTP_REQUEST": "an HTTP request, not TLS",
    "UNSUPPORTED_PROTOCOL": "a TLS version below 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": "a TLS version below 1.3",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
}


def refuse_plain_off_loopback(host: str, who: str) -> None:
    """The plain benchmark mode (no TLS, no login) listens on loopback only. Raises
    ConfigError for any other address."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"{who}: --plain-benchmark-only listens on a loopback address only "
                          f"(127.0.0.1), not {host}; it is not a way to run a network")


def _describe(exc: ssl.SSLError, server_name: str | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        if server_name is not None:
            return (f"the server's certificate was refused ({why}); expected {server_name} "
                    "signed by this network's CA")
        return f"the peer's certificate was refused ({why})"
    reason = str(exc.reason or exc)
    return f"TLS failed: {_REASONS.get(reason, reason)}"


class TlsSession:
    """One TLS connection's state, over memory buffers. Not thread-safe; no I/O."""

    __slots__ = ("_in", "_obj", "_out", "handshake_done", "server_name")

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_name: str | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_name)
        self.server_name = server_name
        self.handshake_done = False

    def start(self) -> bytes:
        """Begin the handshake; returns the bytes to send (a client's ClientHello)."""
        self._step_handshake()
        return self._out.read()

    def receive(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """Feed ciphertext. Returns (plaintext, bytes to send, eof). `handshake_done`
        turns True inside the call that completes it. Raises TlsFailed."""
        self._in.write(data)
        if not self.handshake_done:
            self._step_handshake()
            if not self.handshake_done:
                return b"", self._out.read(), False
        read = self._obj.read
        chunks: list[bytes] = []
        eof = False
        try:
            # Whole records are usually all there: stop when the buffer is empty rather
            # than by an exception (a partial record does raise SSLWantReadError).
            while self._in.pending or self._obj.pending():
                chunk = read(_READ_CHUNK)
                if not chunk:  # the peer's close_notify (OpenSSL reports it as b"")
                    eof = True
                    break
                chunks.append(chunk)
        except _WantRead:
            pass
        except _ZeroReturn:
            eof = True
        except ssl.SSLError as exc:
            raise TlsFailed(_describe(exc, self.server_name)) from exc
        out = self._out.read() if self._out.pending else b""
        if len(chunks) == 1:
            return chunks[0], out, eof
        plain = b"".join(chunks)
        return plain, out, eof

    def send(self, plaintext: bytes | bytearray) -> bytes:
        """Encrypt; returns the records to write. Raises TlsFailed."""
        try:
            self._obj.write(plaintext)
        except ssl.SSLError as exc:
            raise TlsFailed(_describe(exc, self.server_name)) from exc
        return self._out.read()

    def pending_output(self) -> bytes:
        """Bytes still to send (e.g. the alert that explains a failed handshake)."""
        return self._out.read() if self._out.pending else b""

    def close(self) -> bytes:
        """Our `close_notify` (best effort; b"" when nothing can be sent)."""
        if not self.handshake_done:
            return b""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass  # the peer's close_notify has not come: ours is written anyway
        return self._out.read()

    def peer_common_name(self) -> str | None:
        """The common name in the peer's verified certificate (None: no certificate)."""
        cert = self._obj.getpeercert()
        if not cert:
            return None
        subject: Any = cert.get("subject", ())
        for rdn in subject:
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    def _step_handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except _WantRead:
            return
        except ssl.SSLError as exc:
            raise TlsFailed(_describe(exc, self.server_name)) from exc
        self.handshake_done = True
