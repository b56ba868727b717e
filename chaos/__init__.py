"""Fault injection for JackPay: a TCP proxy with switchable faults, and (with the router)
the workload generator and the invariant checker used by `scripts/chaos` and the tests."""
