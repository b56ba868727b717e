"""The router's Prometheus metrics (common/metrics.py: read at scrape time, from a copy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from common.metrics import counter, counters, gauge

if TYPE_CHECKING:
    from router.server import RouterService


def router_metrics(svc: RouterService) -> Iterator[Metric]:
    pipeline = svc.pipeline
    outcomes = dict(pipeline.counts)
    yield counters("jackpay_router_payments", "Payments ended since start, by outcome "
                   "(paid, or the error code)", "outcome", outcomes)
    yield gauge("jackpay_router_payments_in_flight", "Payments running now",
                len(pipeline.inflight))
    holds = dict(svc.book.accounts.holds())
    yield gauge("jackpay_router_holds_minor", "Funds held by payments in flight (minor "
                "units)", sum(holds.values()))
    yield gauge("jackpay_router_sessions", "Payers with a live session",
                len(list(svc.registry.live_sessions())))
    yield gauge("jackpay_router_ledger_connected", "1 while the router has its ledger link",
                1.0 if svc.ledger.connected else 0.0)
    checks = pipeline.signatures
    if checks is not None:
        yield gauge("jackpay_router_signature_checks_waiting", "Signature checks queued or "
                    "sent to the verifier, not answered yet", checks.waiting)
        yield counter("jackpay_router_verifier_restarts", "Verifier processes started again "
                      "after one ended", checks.restarts)
        yield gauge("jackpay_router_signature_checks_inline", "1 once signatures are checked "
                    "on the event loop (the verifier kept ending or could not start)",
                    1.0 if checks.inline else 0.0)
    yield counter("jackpay_router_refused_logins", "Logins refused since start",
                  svc.refused_logins)
    link = dataclasses.asdict(svc.ledger.stats)
    yield counter("jackpay_router_ledger_connects", "Ledger connections made since start",
                  link["connects"])
    yield counter("jackpay_router_ledger_appends", "Append frames sent to the ledger",
                  link["appends_sent"])
    yield counter("jackpay_router_ledger_resends", "Appends sent again (in doubt)",
                  link["resends"])
    yield gauge("jackpay_router_ledger_rows_in_doubt", "Rows whose append is in doubt now",
                link["in_doubt_now"])
    yield gauge("jackpay_router_ledger_last_seq", "Highest ledger seq the router committed",
                svc.book.last_seq)
    if svc.last_reconcile is not None:
        yield gauge("jackpay_router_reconcile_differences", "Differences found by the last "
                    "periodic reconcile (0: the book agrees with the ledger)",
                    svc.last_reconcile)
    times = pipeline.times
    if times is not None:
        yield times.offer.family("jackpay_router_offer_seconds",
                                 "From the offer to the payee's answer")
        yield times.append.family("jackpay_router_append_seconds",
                                  "From the rows sent to the ledger's answer")
        yield times.payment.family("jackpay_router_payment_seconds",
                                   "From the pay request to paid")
