"""`jackpay-router top` against a running router, while payments flow."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from netkit import REPO_ROOT, Network

from router.top import quantile_ms


def test_interval_quantiles_come_from_the_histograms_difference() -> None:
    before = [0] * 14
    after = [0] * 14
    after[3] = 90  # <= 5 ms
    after[6] = 10  # <= 50 ms
    assert quantile_ms(before, after, 0.5) == 5.0
    assert quantile_ms(before, after, 0.99) == 50.0
    assert quantile_ms(after, after, 0.5) is None  # nothing in the interval
    assert quantile_ms([], [], 0.5) is None


async def test_top_shows_payments_per_second_and_latency(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "1000.00", "bob": "0.00"},
                  router_settings={"metrics_addr": "127.0.0.1:0"})
    net.start_ledger()
    net.start_router()
    try:
        async with net.client("alice") as alice, net.client("bob"):
            stop = asyncio.Event()

            async def pay() -> None:
                i = 0
                while not stop.is_set():
                    await alice.send_payment("bob", 1, tx_id=f"top-{i}")
                    i += 1

            payer = asyncio.create_task(pay())
            top = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "router", "top", "--config",
                                 str(net.config_path), "--interval", "0.5", "--count", "2"],
                capture_output=True, text=True, cwd=REPO_ROOT, env=net.env(), timeout=60)
            stop.set()
            await payer
    finally:
        net.stop_all()
    assert top.returncode == 0, top.stderr
    assert top.stdout.count("jackpay-router top") == 2
    paid = [line for line in top.stdout.splitlines() if "paid/s" in line]
    assert paid
    assert float(paid[-1].split()[-2].replace(",", "")) > 0
    assert "metrics off" not in top.stdout
    assert "connected" in top.stdout
    gone = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "router", "top", "--config",
                         str(net.config_path), "--count", "1"], capture_output=True,
        text=True, cwd=REPO_ROOT, env=net.env(), timeout=60)
    assert gone.returncode == 3
