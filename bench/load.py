"""Load drivers and statistics, shared by the limit measurements and JackPay's own.

- `closed_loop`: C workers, each starts its next operation when the previous one ends.
- `open_loop`: operations start on a fixed schedule (rate r for d seconds) whatever the
  system does; latency is measured from the *intended* start, so queueing is not hidden
  (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.stall import Stalls, away_from
from common.procs import children

Op = Callable[[int], Awaitable[bool]]  # op(worker_index) -> succeeded?


@dataclass
class Result:
    label: str
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)  # each payment's (intended) start
    extra: dict[str, object] = field(default_factory=dict)
    began: float = 0.0  # the measured span (time.perf_counter)
    ended: float = 0.0

    def annotate_stalls(self, stalls: Stalls) -> None:
        """Stall time and windows inside the setting, and latency away from the windows
        (bench/stall.py): p50/p99 of the payments that started outside every window."""
        windows = stalls.windows(self.began, self.ended)
        keep = away_from(windows, self.starts)
        away = sorted(lat for lat, k in zip(self.latencies, keep, strict=True) if k)
        self.extra.update(stalls.summary(self.began, self.ended))
        self.extra["excluded_share"] = (round(1 - len(away) / len(self.latencies), 3)
                                        if self.latencies else 0.0)
        self.extra["p50_ms_away"] = round(away[len(away) // 2] * 1000, 3) if away else None
        self.extra["p99_ms_away"] = (round(away[min(len(away) - 1, int(0.99 * len(away)))]
                                           * 1000, 3) if away else None)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

    def summary(self) -> dict[str, object]:
        return {"label": self.label, "ok": self.ok, "failed": self.failed,
                "seconds": round(self.seconds, 3), "per_s": round(self.rate, 1),
                "p50_ms": round(self.pct(50) * 1000, 3), "p95_ms": round(self.pct(95) * 1000, 3),
                "p99_ms": round(self.pct(99) * 1000, 3),
                "max_ms": round(max(self.latencies, default=float("nan")) * 1000, 3),
                **self.extra}


async def closed_loop(label: str, op: Op, concurrency: int, seconds: float,
                      warmup_s: float = 0.3) -> Result:
    res = Result(label)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def worker(i: int) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            ok = await op(i)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                if ok:
                    res.ok += 1
                    res.latencies.append(t1 - t0)
                    res.starts.append(t0)
                else:
                    res.failed += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    res.ended = time.perf_counter()
    res.began = measure_from
    res.seconds = res.ended - measure_from
    return res


async def open_loop(label: str, op: Op, rate: float, seconds: float) -> Result:
    res = Result(label, extra={"offered_per_s": rate})
    n = int(rate * seconds)
    start = time.perf_counter() + 0.05
    # Only the operations still running are kept: a list of every task of the run made
    # the driver's own garbage collections long enough to show up as payment latency.
    running: set[asyncio.Task[None]] = set()

    async def one(i: int, intended: float) -> None:
        ok = await op(i)
        if ok:
            res.ok += 1
            res.latencies.append(time.perf_counter() - intended)
            res.starts.append(intended)
        else:
            res.failed += 1

    for i in range(n):
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, intended))
        running.add(task)
        task.add_done_callback(running.discard)
    while running:
        await asyncio.gather(*running)
    res.ended = time.perf_counter()
    res.began = start
    res.seconds = res.ended - start
    return res


def measure_fsync(directory: str, seconds: float = 1.0, size: int = 80) -> dict[str, float]:
    """Appends of `size` bytes, each followed by fsync, on the given disk."""
    path = os.path.join(directory, "fsync-probe.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    data = b"x" * (size - 1) + b"\n"
    lat = []
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            os.write(fd, data)
            os.fsync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    total = sum(lat)
    return {"fsyncs_per_s": round(len(lat) / total, 1) if total else 0.0,
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 3),
            "max_ms": round(lat[-1] * 1000, 3)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its children (the router's signature
    verifier) have used so far (Linux /proc): live children's own, and those of children
    it has reaped (a verifier replaced mid-setting still counts)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in (pid, *children(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # a child that just ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if p == pid:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    return total / ticks


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
