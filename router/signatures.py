"""The router's checks of signed payments (common/signing.py): the sender's order on
`pay`, the receiver's acceptance on `receipt`, each against the participant's current key
(router/keyring.py). A payment that fails either check ends `bad_signature`; a check that
passes puts the signature into the row, where the ledger's hash chain covers it.

Each check verifies one Ed25519 signature on the event loop (~100–150 µs here);
docs/PERFORMANCE.md has what it costs."""

from __future__ import annotations

from common.messages import RowIn
from common.signing import PAY_TAG, RECEIPT_TAG, verify
from router.keyring import PayerKeys


class PaymentSignatures:
    def __init__(self, network_id: str, keys: PayerKeys) -> None:
        self.network_id = network_id
        self.keys = keys

    def _check(self, signer: str, tag: bytes, row: RowIn, sig: bytes | None) -> bool:
        if sig is None:
            return False
        key = self.keys.get(signer)
        return key is not None and verify(key, sig, tag, self.network_id, row.sender,
                                           row.tx_id, row.receiver, row.amount, row.memo)

    def ordered(self, row: RowIn, sig: bytes | None) -> bool:
        """Whether `sig` is the row's sender's order of exactly this row."""
        return self._check(row.sender, PAY_TAG, row, sig)

    def accepted(self, row: RowIn, sig: bytes | None) -> bool:
        """Whether `sig` is the row's receiver's acceptance of exactly this row."""
        return self._check(row.receiver, RECEIPT_TAG, row, sig)
