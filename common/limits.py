"""Bounds that keep one peer from starving the others. Pure: no I/O, time passed in.

- `ConnectionCaps`: open connections in total and per source address. A server asks
  before it spends anything on a connection (no TLS handshake for a refused one);
- `TokenBucket`: a sustained rate with a burst of one second's worth (per payer);
- `FailedLogins`: failed logins per source address in a fixed one-minute window; an
  address over the limit is refused before any signature is checked (cheap checks
  before expensive ones);
- `Throttle`: at most one log line a second for a flood of the same event, with the
  count of the ones it swallowed.
"""

from __future__ import annotations

from collections import OrderedDict


class ConnectionCaps:
    """How many connections are open, in total and per address."""

    __slots__ = ("_per_address", "max_per_address", "max_total", "total")

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._per_address: dict[str, int] = {}

    def admit(self, address: str) -> str | None:
        """Count a new connection from `address`; returns None if admitted, else why not
        (nothing counted)."""
        if self.total >= self.max_total:
            return f"{self.total} connections open (max_connections {self.max_total})"
        n = self._per_address.get(address, 0)
        if n >= self.max_per_address:
            return (f"{n} connections open from {address} "
                    f"(max_connections_per_address {self.max_per_address})")
        self._per_address[address] = n + 1
        self.total += 1
        return None

    def release(self, address: str) -> None:
        """Forget one admitted connection from `address`."""
        n = self._per_address.get(address, 0)
        if n <= 1:
            self._per_address.pop(address, None)
        else:
            self._per_address[address] = n - 1
        if n:
            self.total -= 1

    def open_from(self, address: str) -> int:
        return self._per_address.get(address, 0)


class TokenBucket:
    """`rate` tokens a second, holding at most `burst` (one second's worth by default)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._tokens = self.burst
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        tokens = self._tokens + (now - self._at) * self.rate
        self._at = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class FailedLogins:
    """Failed logins per address in fixed windows of `window_s`; at most `max_addresses`
    remembered (the oldest windows are forgotten first)."""

    __slots__ = ("_by_address", "limit", "max_addresses", "window_s")

    def __init__(self, limit: int, window_s: float = 60.0, max_addresses: int = 100_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._by_address: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def blocked(self, address: str, now: float) -> bool:
        """True while `address` has `limit` failures in its current window."""
        entry = self._by_address.get(address)
        if entry is None:
            return False
        start, count = entry
        if now - start >= self.window_s:
            del self._by_address[address]
            return False
        return count >= self.limit

    def record_failure(self, address: str, now: float) -> int:
        """Count a failure; returns the address's failures in its window."""
        entry = self._by_address.get(address)
        if entry is None or now - entry[0] >= self.window_s:
            entry = (now, 0)
        count = entry[1] + 1
        self._by_address[address] = (entry[0], count)
        self._by_address.move_to_end(address)
        while len(self._by_address) > self.max_addresses:
            self._by_address.popitem(last=False)
        return count


class Throttle:
    """Lets one event through per `interval_s`; counts the ones it held back."""

    __slots__ = ("_last", "held_back", "interval_s")

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")
        self.held_back = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet. Otherwise log now; returns how many were held back since."""
        if now - self._last < self.interval_s:
            self.held_back += 1
            return None
        self._last = now
        held, self.held_back = self.held_back, 0
        return held
