"""Tests import the network harness from here; it lives in chaos.network so that
scripts/chaos can use it too."""

from chaos.network import (
    REPO_ROOT,
    Network,
    addr_text,
    fsize_limit,
    inspect_router,
    open_ledger_channel,
)

__all__ = ["REPO_ROOT", "Network", "addr_text", "fsize_limit", "inspect_router",
           "open_ledger_channel"]
