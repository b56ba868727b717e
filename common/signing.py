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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.auth import length_prefixed

PAY_TAG = b"jackpay-pay-v1"
RECEIPT_TAG = b"jackpay-receipt-v1"
MIXER_POOL = "_mixer"  # the account a mixed payment's main row pays (jackpay_plugins.mixer)


def payment_bytes(tag: bytes, network_id: str, sender: str, tx_id: str, receiver: str,
                  amount: int, memo: str) -> bytes:
    """The exact bytes signed for the row (sender, tx_id, receiver, amount, memo)."""
    return length_prefixed(tag, network_id.encode(), sender.encode(), tx_id.encode(),
                           receiver.encode(), str(amount).encode(), memo.encode())


def signed_row(to: str, memo: str, mix: bool) -> tuple[str, str]:
    """The (receiver, memo) of the row a `pay` writes, which its signature covers."""
    return (MIXER_POOL, "") if mix else (to, memo)


def sign(key: Ed25519PrivateKey, tag: bytes, network_id: str, sender: str, tx_id: str,
         receiver: str, amount: int, memo: str) -> bytes:
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
