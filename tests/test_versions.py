"""`--version` on every console script: its name, the package version, the protocol."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import PROTOCOL_VERSION

SCRIPTS = ["jackpay-ledger", "jackpay-router", "jackpay-payer", "jackpay-bench",
           "jackpay-keys", "jackpay-mixer"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_says_its_version(script: str) -> None:
    exe = Path(sys.executable).parent / script
    assert exe.exists(), f"{script} is not installed next to {sys.executable}"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"{script} \S+ \(protocol {PROTOCOL_VERSION}\)\n", out.stdout)
