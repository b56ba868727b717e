"""The payer side of JackPay: the importable async client, the payer daemon and its CLI.

    from common.config import load_config
    from payer_client import PayerClient
    cfg = load_config("network.toml")
    async with PayerClient.from_config(cfg, "alice") as client:   # TLS + alice's key
        paid = await client.send_payment("bob", 1250, memo="lunch")   # 12.50

Programs use `PayerClient` directly; the daemon (`jackpay-payer run`) is built on it and
serves the CLI over a Unix control socket.
"""

from payer_client.client import BalanceView, PayerClient, PayerCredentials, make_pay, new_tx_id

__all__ = ["BalanceView", "PayerClient", "PayerCredentials", "make_pay", "new_tx_id"]
