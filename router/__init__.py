"""The JackPay router: payer sessions, the payment pipeline, the ledger client.

Modules, one job each:
- accounts      balances and holds (pure; `funds_available`, `place_hold`, `apply`)
- transactions  the tx_id table: params, state pending/paid/failed, conflicts (pure)
- book          accounts + tx table rebuilt by replaying ledger rows; opening balances (pure)
- ledger_client the seed's `ledgerData`: reconnects, batches appends, never guesses
- sessions      the registry of participants and their live sessions (`receiver_exists`)
- payments      the pipeline of DESIGN §2, one named function per step (`kill_payment`)
- admin         the read-only admin socket (`inspect`)
- server        startup, connections, request handlers, shutdown
- __main__      `python -m router` / `jackpay-router`
"""
