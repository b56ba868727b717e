"""Tests import the network harness from here; it lives in chaos.network so that
scripts/chaos can use it too. Also the helpers for running scripts as a user does."""

import os
from pathlib import Path

from chaos.network import (
    REPO_ROOT,
    Network,
    addr_text,
    inspect_router,
    open_ledger_channel,
)
from common.procs import fsize_limit

PACKAGES = ("common", "ledger", "router", "payer_client", "chaos", "bench", "jackpay_plugins")


def plant_decoys(folder: Path) -> set[str]:
    """Packages named like ours in the user's folder that fail loudly when imported;
    returns what the folder holds, to check nothing else is written there."""
    for name in PACKAGES:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f"raise SystemExit('the decoy {name}/ in the working folder was imported')\n")
    return {p.name for p in folder.iterdir()}


def script_env() -> dict[str, str]:
    """The user's environment: no PYTHONPATH pointing at the repository."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


__all__ = ["REPO_ROOT", "Network", "addr_text", "fsize_limit", "inspect_router",
           "open_ledger_channel", "plant_decoys", "script_env"]
