"""The mixer: pool-and-batch payouts that keep payer and payee apart in the ledger."""
