"""Signed payments: the exact bytes a payer signs to order a payment, and a receiver signs
to accept one. Pure (no I/O, no clock).

Both signatures are Ed25519 over the ledger row the payment writes — the row's own
fields, as the router will write them — prefixed by a tag that says what the signature
means, and the network id:

    tag, network id, sender, tx_id, receiver, amount, memo

each field a 4-byte big-endian length and then its bytes (UTF-8 text; `amount` as the
decimal digits of the integer minor units, "1250" for 12.50), as in the login transcript
(common/auth.py: `length_prefixed`). docs/PROTOCOL.md §7 shows a worked example.

- tag `jackpay-pay-v1`: the sender orders the payment (`pay.sig`).
- tag `jackpay-receipt-v1`: the receiver accepts it (`receipt.sig`, the seed's "confirm
  receipt", now provable).
The tags keep the two apart from each other and from a login (`jackpay-auth-v1`); the
network id stops a signature from being replayed to another network; the row's
(sender, tx_id) names the payment once (the ledger never writes it twice), so a
signature cannot be replayed within the network either.

What the row names is what is signed: for `send --mix` the main row pays the pool
(`MIXER_POOL`, with an empty memo), so the sender signs that, never the payee.
"""

from __future__ import annotations

import json
from pathlib import Path

import nacl.bindings
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.auth import length_prefixed
from common.files import load_json
from common.messages import ISSUER

PAY_TAG = b"jackpay-pay-v1"
LEDGER_TAG = b"jackpay-ledger-v1"  # the ledger's seal of its chain head
RECEIPT_TAG = b"jackpay-receipt-v1"
MIXER_POOL = "_mixer"  # the account a mixed payment's main row pays (jackpay_plugins.mixer)
OPENING_MEMO = "opening balance"
OPENING_PREFIX = "_open:"


def opening_tx_id(payer_id: str) -> str:
    """The tx_id of a participant's opening balance (`_issuer` -> id): issued once."""
    return f"{OPENING_PREFIX}{payer_id}"


def sign_opening(key: Ed25519PrivateKey, network_id: str, payer_id: str, amount: int) -> bytes:
    """The issuer's order of a participant's opening balance."""
    return sign(key, PAY_TAG, network_id, ISSUER, opening_tx_id(payer_id), payer_id, amount,
                OPENING_MEMO)


def read_openings(path: Path) -> dict[str, tuple[int, bytes]]:
    """`keys/public/openings.json`: {payer id: {"amount": minor units, "sig": hex}}.
    Missing file: {}. Raises ValueError for a file that is not that."""
    try:
        data = load_json(path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    out: dict[str, tuple[int, bytes]] = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object of signed openings")
    for pid, entry in data.items():
        try:
            amount, sig = entry["amount"], bytes.fromhex(entry["sig"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: the entry of {pid!r} is not "
                             '{"amount": minor units, "sig": hex}') from None
        if not isinstance(amount, int) or isinstance(amount, bool) or len(sig) != 64:
            raise ValueError(f"{path}: the entry of {pid!r} has a bad amount or signature")
        out[pid] = (amount, sig)
    return out


def openings_json(openings: dict[str, tuple[int, bytes]]) -> bytes:
    return (json.dumps({pid: {"amount": a, "sig": s.hex()} for pid, (a, s)
                        in sorted(openings.items())}, indent=2) + "\n").encode()


def payment_bytes(tag: bytes, network_id: str, sender: str, tx_id: str, receiver: str,
                  amount: int, memo: str) -> bytes:
    """The exact bytes signed for the row (sender, tx_id, receiver, amount, memo)."""
    return length_prefixed(tag, network_id.encode(), sender.encode(), tx_id.encode(),
                           receiver.encode(), str(amount).encode(), memo.encode())


def head_bytes(network_id: str, head_seq: int, head_hash: str) -> bytes:
    """The exact bytes the ledger signs after a durable batch: its chain head. The head's
    hash commits to every row before it (the hash chain), so one signature per batch
    seals each of its rows and all those before."""
    return length_prefixed(LEDGER_TAG, network_id.encode(), str(head_seq).encode(),
                           head_hash.encode())


def signed_row(to: str, memo: str, mix: bool) -> tuple[str, str]:
    """The (receiver, memo) of the row a `pay` writes, which its signature covers."""
    return (MIXER_POOL, "") if mix else (to, memo)


class Signer:
    """A payer's Ed25519 key signing by libsodium: the same signatures as OpenSSL's
    (Ed25519 is deterministic) in ~30 µs instead of 40-55 here, which a payer pays twice
    per payment (its orders and its receipts)."""

    __slots__ = ("_secret",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        _, self._secret = nacl.bindings.crypto_sign_seed_keypair(key.private_bytes_raw())

    def sign(self, data: bytes) -> bytes:
        return nacl.bindings.crypto_sign(data, self._secret)[:64]


def sign(key: Ed25519PrivateKey | Signer, tag: bytes, network_id: str, sender: str,
         tx_id: str, receiver: str, amount: int, memo: str) -> bytes:
    return key.sign(payment_bytes(tag, network_id, sender, tx_id, receiver, amount, memo))


def verify(key: Ed25519PublicKey, signature: bytes, tag: bytes, network_id: str, sender: str,
           tx_id: str, receiver: str, amount: int, memo: str) -> bool:
    """True if `signature` is `key`'s over exactly this row and meaning."""
    try:
        key.verify(signature, payment_bytes(tag, network_id, sender, tx_id, receiver, amount,
                                            memo))
    except InvalidSignature:
        return False
    return True
