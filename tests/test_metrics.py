"""Prometheus metrics scraped over HTTP from a running network, changing as payments
flow; and the cheap histogram they are built from."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from netkit import Network

from common.errors import ConfigError
from common.metrics import Histogram, parse_addr
from common.procs import children


def scrape(addr: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.005, 0.005, 3.0):
        h.observe(v)
    fam = h.family("x_seconds", "doc")
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert samples[("x_seconds_bucket", "0.001")] == 1
    assert samples[("x_seconds_bucket", "0.01")] == 3
    assert samples[("x_seconds_bucket", "+Inf")] == 4
    assert samples[("x_seconds_count", None)] == 4
    assert samples[("x_seconds_sum", None)] == pytest.approx(3.0105)


def test_a_bad_metrics_address_is_refused() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_addr("9401")
    assert parse_addr("127.0.0.1:0") == ("127.0.0.1", 0)


async def test_metrics_change_as_payments_flow(tmp_path: Path) -> None:
    net = Network(tmp_path, participants={"alice": "100.00", "bob": "0.00"},
                  router_settings={"metrics_addr": "127.0.0.1:0"},
                  ledger_settings={"metrics_addr": "127.0.0.1:0"})
    net.start_ledger()
    net.start_router()
    bob = net.start_payer("bob", "--metrics", "127.0.0.1:0")
    router_at = net.procs["router"].ready["metrics"]
    ledger_at = net.procs["ledger"].ready["metrics"]
    bob_at = bob.ready["metrics"]
    try:
        before = await asyncio.to_thread(scrape, router_at)
        ledger_before = await asyncio.to_thread(scrape, ledger_at)
        async with net.client("alice") as alice:
            for i in range(3):
                await alice.send_payment("bob", 100, tx_id=f"m{i}")
            with pytest.raises(Exception, match="insufficient_funds"):
                await alice.send_payment("bob", 10**9, tx_id="too-much")
        for _ in range(100):  # bob's daemon counts a payment once `settled` reaches it
            bob_metrics = await asyncio.to_thread(scrape, bob_at)
            if bob_metrics.get("jackpay_payer_received_total") == 3:
                break
            await asyncio.sleep(0.05)
        after = await asyncio.to_thread(scrape, router_at)
        ledger_after = await asyncio.to_thread(scrape, ledger_at)
        # The router's signature verifier is killed: another is started, the next signed
        # payment is paid, and the metrics count the restart.
        router_pid = net.procs["router"].pid
        (verifier,) = children(router_pid)
        os.kill(verifier, signal.SIGKILL)
        async with net.client("alice") as alice:
            await alice.send_payment("bob", 100, tx_id="after-the-kill")
        restarted = await asyncio.to_thread(scrape, router_at)
    finally:
        net.stop_all()
    assert after["jackpay_router_verifier_restarts_total"] == 0
    assert after["jackpay_router_signature_checks_waiting"] == 0
    assert after["jackpay_router_signature_checks_inline"] == 0
    assert restarted["jackpay_router_verifier_restarts_total"] == 1
    assert restarted["jackpay_router_signature_checks_inline"] == 0
    paid = 'jackpay_router_payments_total{outcome="paid"}'
    assert restarted[paid] - after[paid] == 1
    assert after[paid] - before.get(paid, 0) == 3
    assert after['jackpay_router_payments_total{outcome="insufficient_funds"}'] == 1
    assert after["jackpay_router_payment_seconds_count"] == 3
    assert after["jackpay_router_append_seconds_count"] == 3
    assert after["jackpay_router_offer_seconds_count"] == 3
    assert after["jackpay_router_ledger_connected"] == 1
    assert after["jackpay_router_payments_in_flight"] == 0
    assert after["jackpay_router_sessions"] >= 1
    assert ledger_after["jackpay_ledger_rows"] - ledger_before["jackpay_ledger_rows"] == 3
    assert ledger_after["jackpay_ledger_index_ok"] == 1
    assert 0 <= ledger_after["jackpay_ledger_rows_in_memory"] <= ledger_after["jackpay_ledger_rows"]
    assert ledger_after["jackpay_ledger_fsync_seconds_count"] >= 1
    assert ledger_after['jackpay_ledger_batch_rows_bucket{le="+Inf"}'] >= 1
    assert bob_metrics["jackpay_payer_received_total"] == 3
    assert bob_metrics["jackpay_payer_connected"] == 1
    assert any(re.match(r"jackpay_router_payment_seconds_bucket", k) for k in after)
