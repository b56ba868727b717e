"""`jackpay-keys CONFIG`: create, renew, rotate and list a network's keys and certificates.

    jackpay-keys network.toml [--days N] [--renew [--renew-within-days N]] [--rotate NAME ...]
    jackpay-keys network.toml --list

A run creates what the key folder (layout in `common.keys`) lacks: the network CA, TLS
certificates for the servers and the ledger's clients, an Ed25519 key pair per participant.
Run again after adding a participant, only that participant's keys appear: one command
sets a network up and keeps it whole.

Rules:
- an existing private key is never overwritten, except by `--rotate NAME`; a missing
  certificate or public half is issued or derived from the private key that is there;
- private keys are created 0600 (O_EXCL: never readable by others) in 0700 folders; every
  file is written to a temp file beside it, fsynced, then linked (new: never overwrites)
  or renamed (renew, rotate) into place, so a crash never leaves half a key;
- an existing private key is checked (`check_private_file`) before it signs or is certified;
  a new CA is made only where no certificate exists (one would not verify against it);
- a public half without its private key (kept on another host) is left alone, with a note;
- `--renew` keeps every key, and the CA its subject, so what the CA signed still verifies;
  `--rotate ca` is refused (a new CA means new certificates for everyone);
- exit 0 done; 2 bad usage, config or key file, with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import keys
from common.config import NetworkConfig, load_config
from common.errors import ConfigError
from common.files import updating, write_atomically
from common.keys import KeyFileError, KeyStore
from common.messages import DTG_FORMAT
from common.signing import openings_json, read_openings, sign_opening
from common.version import add_version

CA_DAYS = 3650
WARN_DAYS = 30
CLOCK_SKEW = timedelta(minutes=5)
TLS_NAMES = (*keys.TLS_SERVERS, *keys.TLS_CLIENTS)
Log = Callable[[str], None]
_PEM = serialization.Encoding.PEM


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def _build(subject: x509.Name, key: ec.EllipticCurvePublicKey, issuer: x509.Name,
           signer: ec.EllipticCurvePrivateKey, now: datetime, not_after: datetime,
           exts: Sequence[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False))
    for ext, critical in exts:
        b = b.add_extension(ext, critical=critical)
    return b.sign(signer, hashes.SHA256())


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM certificate: {exc}") from None


def _rotation_targets(cfg: NetworkConfig, names: list[str]) -> list[tuple[bool, str]]:
    """(is a participant, name) per `--rotate NAME`, a participant id winning over a TLS
    name. Raises ConfigError for `ca` and unknown names, before anything changes."""
    payers = {p.id for p in cfg.participants}
    for name in names:
        if name == "ca" and name not in payers:
            raise ConfigError("--rotate ca is refused: a new CA key means new certificates for "
                              "every server and client and a new ca.crt on every host; to "
                              "start over move the keys folder aside and run jackpay-keys "
                              "again (`--renew` extends the CA, keeping its key)")
        if name not in payers and name not in TLS_NAMES:
            raise ConfigError(f"--rotate {name}: not a participant of this network nor a TLS "
                              f"identity ({', '.join(TLS_NAMES)})")
    return [(name in payers, name) for name in names]


MAX_DAYS = 36_500  # a certificate's validity: far past any key's useful life, and its
# end date stays a date X.509 (and Python) can write


class _Keys:
    """One run over a network's key folder: writes files and reports each one."""

    def __init__(self, cfg: NetworkConfig, days: int, now: datetime | None,
                 log: Log | None) -> None:
        if not 1 <= days <= MAX_DAYS:
            raise ConfigError(f"--days must be 1 to {MAX_DAYS} (100 years), not {days}")
        self.cfg, self.store, self.days = cfg, KeyStore.for_config(cfg), days
        self.now = now or datetime.now(UTC)
        self.lines: list[str] = []
        self._log = log
        self._ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None

    def say(self, line: str) -> None:
        self.lines.append(line)
        if self._log is not None:
            self._log(line)

    def _folders_for(self, path: Path) -> bool:
        """Make the folders `path` goes in (0700 private, 0755 public, never group or
        world-writable); True if it is a private file."""
        s = self.store
        private = path.is_relative_to(s.private_dir)
        s.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        for d in (s.private_dir if private else s.public_dir, path.parent):
            d.mkdir(mode=0o700 if private else 0o755, exist_ok=True)
        return private

    def write(self, path: Path, data: bytes, verb: str, until: datetime | None = None) -> None:
        """Atomically: "created" links a new file (never overwrites), else renames over."""
        private = self._folders_for(path)
        mode = 0o600 if private else 0o644
        write_atomically(path, data, mode, exclusive=verb == "created")
        self.say(f"{verb} {_show(path)} ({mode:04o}"
                 + (f", until {until:%Y-%m-%d})" if until else ")"))

    def ec_key(self, path: Path, new: bool) -> ec.EllipticCurvePrivateKey:
        """The (checked) key at `path`; a new one if it is missing or `new` (rotate)."""
        if path.exists() and not new:
            return keys.load_ec_private(path)
        key = ec.generate_private_key(ec.SECP256R1())
        self.write(path, _private_pem(key), "rotated" if new else "created")
        return key

    def ca(self, purpose: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The CA key and certificate; a new CA only where no certificate exists yet."""
        if self._ca is None:
            s = self.store
            signed = [s.ca_cert, *(s.cert(n) for n in TLS_NAMES)]
            if not s.ca_key.exists() and any(c.exists() for c in signed):
                raise KeyFileError(
                    f"the CA key {_show(s.ca_key)} is needed to issue {purpose} but is not "
                    f"there; put it back, or move {_show(s.root)} aside and run again to "
                    "make a new CA (every certificate, and ca.crt on every host, then change)")
            key = self.ec_key(s.ca_key, new=False)
            if s.ca_cert.exists():
                cert = _load_cert(s.ca_cert)
                if cert.public_key() != key.public_key():
                    raise KeyFileError(f"{s.ca_key} is not the key of {s.ca_cert}")
            else:
                cert = self.issue_ca(key, "created")
            self._ca = (key, cert)
        return self._ca

    def issue_ca(self, key: ec.EllipticCurvePrivateKey, verb: str,
                 subject: x509.Name | None = None) -> x509.Certificate:
        name = subject or _cn(f"JackPay CA {self.store.network_id}")
        not_after = self.now + timedelta(days=CA_DAYS)
        cert = _build(name, key.public_key(), name, key, self.now, not_after, [
            (x509.BasicConstraints(ca=True, path_length=0), True), (_key_usage(ca=True), True)])
        self.write(self.store.ca_cert, cert.public_bytes(_PEM), verb, not_after)
        return cert

    def issue_tls(self, name: str, verb: str) -> None:
        """A certificate for TLS identity `name`, for its key, which is made (missing, or
        rotated) only once the CA is known to be usable."""
        ca_key, ca_cert = self.ca(f"the certificate of {name}")
        key = self.ec_key(self.store.key(name), new=verb == "rotated")
        server = name in keys.TLS_SERVERS
        cn = self.store.server_name(name) if server else keys.TLS_CLIENTS[name]
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        exts: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(ca=False), True),
            (x509.ExtendedKeyUsage([eku]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)]
        if server:
            exts.append((x509.SubjectAlternativeName([x509.DNSName(cn)]), False))
        not_after = min(self.now + timedelta(days=self.days), ca_cert.not_valid_after_utc)
        cert = _build(_cn(cn), key.public_key(), ca_cert.subject, ca_key, self.now, not_after,
                      exts)
        self.write(self.store.cert(name), cert.public_bytes(_PEM), verb, not_after)

    def new_signer(self, name: str, verb: str) -> None:
        key = Ed25519PrivateKey.generate()
        self.write(self.store.key(name), _private_pem(key), verb)
        self.write(self.store.signer_public(name), keys.public_pem(key.public_key()), verb)

    def ensure_signers(self) -> None:
        """The issuer's and the router's signing keys, then the config's opening balances
        signed by the issuer (`keys/public/openings.json`, rewritten when one is missing or
        its amount changed). Without the issuer's private key here (kept offline, as it
        should be), the openings are left as they are, with a note."""
        s = self.store
        for name in keys.SIGNERS:
            priv, pub = s.key(name), s.signer_public(name)
            if priv.exists() and not pub.exists():
                self.write(pub, keys.public_pem(s.load_signer(name).public_key()), "created")
            elif pub.exists() and not priv.exists():
                self.note_no_key(pub, priv, name)
            elif not priv.exists():
                self.new_signer(name, "created")
        self._folders_for(s.openings)
        with updating(s.openings):  # `participants add` may be signing one now
            self.sign_openings()

    def sign_openings(self) -> None:
        """The config's opening balances, signed by the issuer into openings.json."""
        s = self.store
        try:
            signed = read_openings(s.openings)
        except ValueError as exc:
            raise KeyFileError(str(exc)) from None
        wanted = {p.id: p.opening_minor for p in self.cfg.participants if p.opening_minor > 0}
        stale = sorted(pid for pid, amount in wanted.items()
                       if signed.get(pid, (None, b""))[0] != amount)
        if not stale:
            return
        if not s.key(keys.ISSUER_SIGNER).exists():
            self.say(f"note: {len(stale)} opening balances ({', '.join(stale[:5])}) are not "
                     f"signed: the issuer's private key is not here ({_show(s.key('issuer'))})")
            return
        issuer = s.load_signer(keys.ISSUER_SIGNER)
        for pid in stale:
            signed[pid] = (wanted[pid], sign_opening(issuer, self.cfg.network.id, pid,
                                                     wanted[pid]))
        self.write(s.openings, openings_json(signed), "signed" if s.openings.exists()
                   else "created")

    def new_payer(self, payer_id: str, verb: str) -> None:
        key = Ed25519PrivateKey.generate()
        self.write(self.store.payer_private(payer_id), _private_pem(key), verb)
        self.write(self.store.payer_public(payer_id), keys.public_pem(key.public_key()), verb)

    def check_cert(self, path: Path) -> None:
        """Warn about a certificate that expires within WARN_DAYS (or has expired)."""
        cert = _load_cert(path)
        left = cert.not_valid_after_utc - self.now
        if left < timedelta(days=WARN_DAYS):
            when = "has expired" if left <= timedelta(0) else f"expires in {left.days} days"
            self.say(f"warning: {_show(path)} {when} ({cert.not_valid_after_utc:%Y-%m-%d}); "
                     "run `jackpay-keys CONFIG --renew`")

    def note_no_key(self, public: Path, private: Path, name: str) -> None:
        self.say(f"note: {_show(public)} has no private key here ({_show(private)}); left "
                 f"alone (`--rotate {name}` makes a new pair)")

    def ensure(self) -> list[str]:
        s = self.store
        if not s.ca_cert.exists():
            self.ca("the CA certificate")
        self.check_cert(s.ca_cert)
        for name in TLS_NAMES:
            if not s.cert(name).exists():
                self.issue_tls(name, "created")
            elif not s.key(name).exists():
                self.note_no_key(s.cert(name), s.key(name), name)
            self.check_cert(s.cert(name))
        for p in self.cfg.participants:
            priv, pub = s.payer_private(p.id), s.payer_public(p.id)
            if priv.exists() and not pub.exists():
                self.write(pub, keys.public_pem(s.load_payer_key(p.id).public_key()), "created")
            elif pub.exists() and not priv.exists():
                self.note_no_key(pub, priv, p.id)
            elif not priv.exists():
                self.new_payer(p.id, "created")
            elif keys.raw_public(s.load_payer_key(p.id).public_key()) != keys.raw_public(
                    s.load_payer_public(p.id)):  # e.g. a --rotate cut off between the two
                self.say(f"warning: {_show(pub)} is not the public half of {_show(priv)}: "
                         f"{p.id} cannot log in; run  jackpay-keys CONFIG --rotate {p.id}")
        self.ensure_signers()
        return self.lines

    def renew(self, within_days: int) -> list[str]:
        if not 0 <= within_days <= MAX_DAYS:
            raise ConfigError(f"--renew-within-days must be 0 to {MAX_DAYS}, not {within_days}")
        s = self.store
        limit = self.now + timedelta(days=within_days)
        if s.ca_cert.exists() and (old := _load_cert(s.ca_cert)).not_valid_after_utc <= limit:
            key, _ = self.ca("a renewed CA certificate")
            self._ca = (key, self.issue_ca(key, "renewed", old.subject))
        for name in TLS_NAMES:
            cert = s.cert(name)
            if cert.exists() and _load_cert(cert).not_valid_after_utc <= limit:
                if s.key(name).exists():
                    self.issue_tls(name, "renewed")
                else:
                    self.say(f"warning: cannot renew {_show(cert)}: its key is not here")
        return self.lines

    def retire(self, payer_id: str) -> None:
        """Keep the participant's current public key in its history, valid until now, so
        rows it signed before still verify (`jackpay-ledger verify --keys`)."""
        s = self.store
        if not s.payer_public(payer_id).exists():
            return
        path = s.payer_retired(payer_id)
        entries = [{"public": keys.raw_public(k).hex(), "until": until}
                   for until, k in s.load_payer_retired(payer_id)]  # KeyFileError if damaged
        entries.append({"public": keys.raw_public(s.load_payer_public(payer_id)).hex(),
                        "until": self.now.strftime(DTG_FORMAT)})
        self.write(path, (json.dumps(entries, indent=2) + "\n").encode(), "updated")

    def rotate(self, names: list[str]) -> list[str]:
        for is_payer, name in _rotation_targets(self.cfg, names):
            if is_payer:
                self.retire(name)
                self.new_payer(name, "rotated")
            else:
                self.issue_tls(name, "rotated")
        return self.lines


def ensure_keys(cfg: NetworkConfig, *, days: int = 365, now: datetime | None = None,
                log: Log | None = None) -> list[str]:
    """Create whatever key or certificate `cfg`'s network lacks; returns the report lines
    (`created ...`, `warning: ...`, `note: ...`). Raises ConfigError or OSError."""
    return _Keys(cfg, days, now, log).ensure()


def renew(cfg: NetworkConfig, within_days: int = 30, days: int = 365,
          now: datetime | None = None, log: Log | None = None) -> list[str]:
    """Reissue, with the same keys, every certificate that expires within `within_days`."""
    return _Keys(cfg, days, now, log).renew(within_days)


def rotate(cfg: NetworkConfig, names: Iterable[str], days: int = 365,
           now: datetime | None = None, log: Log | None = None) -> list[str]:
    """A new key pair per participant id, a new key and certificate per TLS name."""
    return _Keys(cfg, days, now, log).rotate(list(names))


def describe(cfg: NetworkConfig, now: datetime | None = None) -> list[str]:
    """An aligned table of every key and certificate (what --list prints); writes nothing."""
    s, now = KeyStore.for_config(cfg), now or datetime.now(UTC)
    rows = [("FILE", "KIND", "NAME", "NOT AFTER", "DAYS", "KEY / STATE")]
    for name, crt, key in [("ca", s.ca_cert, s.ca_key),
                           *((n, s.cert(n), s.key(n)) for n in TLS_NAMES)]:
        kind = {"ca": "CA", **dict.fromkeys(keys.TLS_SERVERS, "TLS server")}.get(name, "TLS client")
        if not crt.exists():
            rows.append((_show(crt), kind, name, "-", "-",
                         "missing (key present)" if key.exists() else "missing"))
            continue
        c = _load_cert(crt)
        rows.append((_show(crt), kind, c.subject.rfc4514_string(),
                     f"{c.not_valid_after_utc:%Y-%m-%d}", str((c.not_valid_after_utc - now).days),
                     "ok" if key.exists() else "no private key here"))
    for p in cfg.participants:
        pub, priv = s.payer_public(p.id), s.payer_private(p.id)
        if pub.exists():
            state = keys.raw_public(s.load_payer_public(p.id)).hex()[:16]
            state += "" if priv.exists() else " (no private key here)"
        else:
            state = "missing (private key present)" if priv.exists() else "missing"
        rows.append((_show(pub), "payer", p.id, "-", "-", state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    missing = sum(r[5].startswith("missing") for r in rows)
    lines.append(f"{missing} missing: run `jackpay-keys CONFIG` to create them" if missing
                 else f"keys complete for network {s.network_id} in {_show(s.root)}")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jackpay-keys", description="Create what a JackPay "
                                "network's key folder lacks; renew, rotate or list its keys.")
    p.add_argument("config", help="the network's TOML config ([network] id, keys_dir)")
    p.add_argument("--days", type=int, default=365, help="validity of new TLS certificates")
    p.add_argument("--renew", action="store_true", help="reissue certificates (CA included) "
                   "that expire within --renew-within-days (default 30), keeping the keys")
    p.add_argument("--renew-within-days", type=int, default=30, metavar="N")
    p.add_argument("--rotate", action="append", default=[], metavar="NAME", help="new key "
                   f"(and certificate) for a participant id or {', '.join(TLS_NAMES)}")
    p.add_argument("--list", action="store_true", help="print every key; create nothing")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 0
    now = datetime.now(UTC)
    try:
        cfg = load_config(args.config)
        if args.list:
            print("\n".join(describe(cfg, now)))
            return 0
        _rotation_targets(cfg, args.rotate)  # refuse a bad name before changing anything
        lines = renew(cfg, args.renew_within_days, args.days, now, print) if args.renew else []
        lines += ensure_keys(cfg, days=args.days, now=now, log=print)
        lines += rotate(cfg, args.rotate, args.days, now, print)
    except (ConfigError, OSError) as exc:
        print(f"jackpay-keys: {exc}", file=sys.stderr)
        return 2
    if all(line.startswith(("warning:", "note:")) for line in lines):
        print(f"keys complete for network {cfg.network.id} in {_show(cfg.keys_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
