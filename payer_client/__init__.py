"""The payer side of JackPay: the importable async client, the payer daemon and its CLI.

    from payer_client import PayerClient
    async with PayerClient("127.0.0.1", 7400, "alice") as client:
        paid = await client.send_payment("bob", 1250, memo="lunch")   # 12.50

Programs use `PayerClient` directly; the daemon (`jackpay-payer run`) is built on it and
serves the CLI over a Unix control socket.
"""

from payer_client.client import BalanceView, PayerClient, make_pay, new_tx_id

__all__ = ["BalanceView", "PayerClient", "make_pay", "new_tx_id"]
