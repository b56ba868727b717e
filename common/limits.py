"""Bounds that keep one peer from starving the others. Pure: no I/O, time passed in.

- `ServerLimits`: what a TCP server admits: open connections in total and per source
  address, connections still in their handshake at once, new connections per address
  per second. A server asks before it spends anything on a connection (no TLS handshake
  for a refused one); `address_key` groups IPv6 clients by /64 (one host's share);
- `ConnectionCaps`: the open-connection counts;
- `RateByKey`: one TokenBucket per key (address), at most `max_keys` remembered;
- `TokenBucket`: a sustained rate with a burst of one second's worth (per payer);
- `FailedLogins`: failed logins per source address in a fixed one-minute window; an
  address over the limit is refused before any signature is checked (cheap checks
  before expensive ones);
- `Throttle`: at most one log line a second for a flood of the same event, with the
  count of the ones it swallowed.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_connections: int
    max_connections_per_address: int
    # Connections that have not finished TLS and their login: when this many are open,
    # one is dropped for a newcomer (common.aio says which), so idle sockets cannot lock
    # anyone out.
    max_handshaking: int
    # New connections per address per second (a burst of five seconds' worth).
    new_connections_per_address_per_s: float


def address_key(address: str) -> str:
    """What one client is counted as: its IPv4 address, or its IPv6 /64 (a host holds a
    whole /64, so counting single IPv6 addresses would count nothing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


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
        full = self.full(address)
        if full is not None:
            return self.describe(full, address)
        self._per_address[address] = self._per_address.get(address, 0) + 1
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

    def full(self, address: str) -> str | None:
        """Which cap a new connection from `address` would break: "total", "address", or
        None (it would be admitted)."""
        if self.total >= self.max_total:
            return "total"
        if self._per_address.get(address, 0) >= self.max_per_address:
            return "address"
        return None

    def describe(self, full: str, address: str) -> str:
        """The refusal, in words, for the cap `full` names."""
        if full == "total":
            return f"{self.total} connections open (max_connections {self.max_total})"
        return (f"{self.open_from(address)} connections open from {address} "
                f"(max_connections_per_address {self.max_per_address})")


class TokenBucket:
    """`rate` tokens a second, holding at most `burst` (one second's worth by default)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._tokens = self.burst
        self._at = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many."""
        tokens = self._tokens + (now - self._at) * self.rate
        self._at = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < cost:
            self._tokens = tokens
            return False
        self._tokens = tokens - cost
        return True


class RateByKey:
    """A TokenBucket per key, made full on first use; the least recently used keys are
    forgotten beyond `max_keys` (memory stays bounded whatever the keys)."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, now, self.burst)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)


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
