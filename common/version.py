"""`--version` for every console script: the installed package's version and the wire
protocol it speaks (peers must speak the same one)."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from common import PROTOCOL_VERSION


def jackpay_version() -> str:
    try:
        return version("jackpay")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: prints e.g. `jackpay-router 0.1.0 (protocol 3)` and exits 0."""
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {jackpay_version()} (protocol {PROTOCOL_VERSION})")
