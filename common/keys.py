"""Where a network's keys and certificates live, and how they are loaded. No sockets.

One folder per network (`[network] keys_dir`, default `keys/` beside the config), so the
keys outlive every run and every tool finds them from the config alone:

    keys/public/ca.crt                 the network CA (every client pins it)
    keys/public/router.crt             TLS server certificate, DNS name router.<network id>
    keys/public/ledger.crt             TLS server certificate, DNS name ledger.<network id>
    keys/public/router-client.crt      the router's client certificate at the ledger (CN router)
    keys/public/auditor.crt            a read-only client certificate at the ledger (CN auditor)
    keys/public/payers/<id>.pub        each participant's Ed25519 public key (PEM)
    keys/public/issuer.pub             the issuer's Ed25519 key: signs opening balances
    keys/public/pool-signer.pub        the router's Ed25519 key for debits of system accounts
    keys/public/ledger-signer.pub      the ledger's Ed25519 key: seals its chain head
    keys/public/openings.json          the opening balances, signed by the issuer
    keys/private/ca.key                ... and the private halves, mode 0600
    keys/private/<name>.key
    keys/private/payers/<id>.key

Rules:
- a private key file readable or writable by anyone but its owner is refused, with the
  `chmod` that fixes it (ssh's rule); so is a missing one, naming `jackpay-keys`;
- only public keys and certificates are under `public/`: that folder can be handed out;
- nothing here writes a file (`common.keygen` does).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from common.config import NetworkConfig
from common.errors import ConfigError
from common.files import load_json

# TLS identities. Servers: the DNS name in the certificate is `<name>.<network id>`.
TLS_SERVERS = ("router", "ledger")
# Clients at the ledger: the certificate's common name is the identity the ledger sees.
TLS_CLIENTS = {"router-client": "router", "auditor": "auditor"}
ROUTER_IDENTITY = "router"
# Ed25519 signing identities (common/signing.py): the issuer signs opening balances (its
# private key belongs offline, never on the router); the router signs debits of system
# accounts (pools such as `_mixer`) with `pool-signer`.
ISSUER_SIGNER = "issuer"
POOL_SIGNER = "pool-signer"
LEDGER_SIGNER = "ledger-signer"  # the ledger's: seals its chain head in every receipt
SIGNERS = (ISSUER_SIGNER, POOL_SIGNER, LEDGER_SIGNER)


class KeyFileError(ConfigError):
    """A key or certificate is missing, unreadable, malformed or too open."""


def check_private_file(path: Path) -> None:
    """Raises KeyFileError unless `path` exists, belongs to this user and only its owner
    may read or write it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"{path} is missing; run `jackpay-keys CONFIG` to create the "
                           "network's keys") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by others (mode {mode:04o}); a private key "
                           f"must be yours alone: run  chmod 600 {path}")
    if st.st_uid != os.geteuid():
        raise KeyFileError(f"{path} belongs to another user (uid {st.st_uid}); a private key "
                           f"must be yours: run  chown {os.geteuid()} {path}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path} is missing; run `jackpay-keys CONFIG` to create the "
                           "network's keys") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class KeyStore:
    """The paths of one network's keys, and loaders that check them."""

    root: Path
    network_id: str

    @classmethod
    def for_config(cls, cfg: NetworkConfig) -> KeyStore:
        return cls(cfg.keys_dir, cfg.network.id)

    # --- layout --------------------------------------------------------------------

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    @property
    def private_dir(self) -> Path:
        return self.root / "private"

    @property
    def payers_public_dir(self) -> Path:
        return self.public_dir / "payers"

    @property
    def ca_cert(self) -> Path:
        return self.public_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.private_dir / "ca.key"

    def cert(self, name: str) -> Path:
        """The certificate of a TLS identity (`router`, `ledger`, `router-client`, ...)."""
        return self.public_dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.private_dir / f"{name}.key"

    def payer_public(self, payer_id: str) -> Path:
        return self.payers_public_dir / f"{payer_id}.pub"

    def payer_retired(self, payer_id: str) -> Path:
        """The participant's retired public keys, with when each stopped being valid."""
        return self.payers_public_dir / f"{payer_id}.retired.json"

    def load_payer_retired(self, payer_id: str) -> list[tuple[str, Ed25519PublicKey]]:
        """(valid until, key) of every retired key, oldest first; `until` is a ledger time
        (`2026-12-01T10:00:00.000000Z`). Raises KeyFileError for a file that is not that."""
        path = self.payer_retired(payer_id)
        try:
            entries = load_json(read_public_file(path, RETIRED_KEYS_MAX_BYTES))
        except KeyFileError:
            if not path.exists():
                return []
            raise
        except ValueError as exc:
            raise KeyFileError(f"{path} is not JSON: {exc}") from None
        out = []
        try:
            for e in entries:
                key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(e["public"]))
                out.append((str(e["until"]), key))
        except (TypeError, KeyError, ValueError):
            raise KeyFileError(f"{path}: entries must be {{\"public\": hex, \"until\": "
                               "time}") from None
        return sorted(out, key=lambda e: e[0])

    def payer_private(self, payer_id: str) -> Path:
        return self.private_dir / "payers" / f"{payer_id}.key"

    def signer_public(self, name: str) -> Path:
        """The public half of a signing identity (`issuer`, `pool-signer`)."""
        return self.public_dir / f"{name}.pub"

    @property
    def openings(self) -> Path:
        return self.public_dir / "openings.json"

    def load_signer(self, name: str) -> Ed25519PrivateKey:
        """A signing identity's private key. Raises KeyFileError."""
        return load_ed25519_private(self.key(name))

    def load_signer_public(self, name: str) -> Ed25519PublicKey:
        path = self.signer_public(name)
        return load_public_key(read_public_file(path), str(path))

    def server_name(self, server: str) -> str:
        """The DNS name in a server's certificate: what clients verify and what payers
        sign (`router.<network id>`)."""
        return f"{server}.{self.network_id}"

    # --- loading -------------------------------------------------------------------

    def private_key_path(self, name: str) -> Path:
        """The checked path of a TLS identity's private key (for ssl.load_cert_chain).
        Raises KeyFileError."""
        path = self.key(name)
        check_private_file(path)
        return path

    def load_payer_key(self, payer_id: str) -> Ed25519PrivateKey:
        """A participant's signing key. Raises KeyFileError (missing, too open, not an
        Ed25519 private key)."""
        return load_ed25519_private(self.payer_private(payer_id))

    def load_payer_public(self, payer_id: str) -> Ed25519PublicKey:
        """A participant's public key, from a file the router can trust (see
        `read_public_file`). Raises KeyFileError."""
        path = self.payer_public(payer_id)
        return load_public_key(read_public_file(path), str(path))

    def unsafe_public_folder(self) -> str | None:
        """Why the public key folders cannot be trusted (writable by group or others:
        anyone could then put in a key and log in as anyone), or None."""
        for folder in (self.root, self.public_dir, self.payers_public_dir):
            try:
                st = os.stat(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                return f"cannot read {folder}: {exc.strerror or exc}"
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o022:
                return (f"{folder} is writable by others (mode {mode:04o}), so anyone could "
                        f"replace a participant's key: run  chmod 755 {folder}")
        return None


def _load_private(path: Path) -> PrivateKeyTypes:
    """The private key in PEM file `path`, after `check_private_file`. Raises KeyFileError."""
    check_private_file(path)
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except Exception as exc:  # ValueError, TypeError, UnsupportedAlgorithm, ...
        raise KeyFileError(f"{path} is not a PEM private key: {exc}") from None


def load_ed25519_private(path: Path) -> Ed25519PrivateKey:
    """A participant's signing key from `path`. Raises KeyFileError."""
    key = _load_private(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_ec_private(path: Path) -> ec.EllipticCurvePrivateKey:
    """A TLS identity's (or the CA's) ECDSA key from `path`. Raises KeyFileError."""
    key = _load_private(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path} is not an ECDSA private key")
    return key


PUBLIC_KEY_MAX_BYTES = 4096
RETIRED_KEYS_MAX_BYTES = 1 << 20  # a key's history: ~130 bytes a rotation


def read_public_file(path: Path, max_bytes: int = PUBLIC_KEY_MAX_BYTES) -> bytes:
    """The bytes of a public key file as a login may trust them: a regular file (not a
    symbolic link, not a FIFO that would block), owned by this user or root, writable by
    its owner only, at most `max_bytes` (4 KiB: one key). Raises KeyFileError saying
    which rule it broke."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"{path} is missing; run `jackpay-keys CONFIG` to create the "
                           "network's keys") from None
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror}"
        raise KeyFileError(f"{path} {why}; a public key must be a plain file") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise KeyFileError(f"{path} belongs to another user (uid {st.st_uid})")
        if mode & 0o022:
            raise KeyFileError(f"{path} is writable by others (mode {mode:04o}): run  "
                               f"chmod 644 {path}")
        if st.st_size > max_bytes:
            raise KeyFileError(f"{path} is {st.st_size} bytes, too large for a public key")
        return os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)


def load_public_key(data: bytes, source: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes. Raises KeyFileError naming `source`."""
    try:
        key = serialization.load_pem_public_key(data)
    except Exception as exc:  # ValueError, UnsupportedAlgorithm, ...: unusable either way
        raise KeyFileError(f"{source} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} is not an Ed25519 public key")
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (what other-language clients usually hold)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
