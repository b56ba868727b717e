"""The host's stalls, measured in the same run as the payments (`scripts/bench`).

One low-duty probe per CPU (`python -m bench.stall --cpu N`): pinned to its CPU, at
real-time priority when allowed, it does a fixed 100 µs of work every 5 ms. When a period's
work takes 3× its nominal time or more, the CPU was taken from it — by the host (a VM
stall), or by something of higher priority — and it prints the period's start and end
(`time.perf_counter`, CLOCK_MONOTONIC: the same clock as the bench's). Its lateness is
the machine's, not JackPay's: on this VM both CPUs stop together for 50–150 ms every
second or so, with or without JackPay running.

A *stall window* is fixed, not tuned: such a period widened by 50 ms before and 200 ms
after (payments that started just before a stall, and the backlog it leaves). Each bench
setting reports the stall time and windows inside it, and every latency figure twice: all
payments, and the payments whose start lies outside every window (with the share left
out).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

PERIOD_S = 0.005
WORK_S = 0.0001
SLOW_FACTOR = 3.0
BEFORE_S = 0.05
AFTER_S = 0.2


def _calibrate(work_s: float) -> int:
    """Loop iterations that take `work_s` on this CPU (the fastest of a few tries)."""
    n = 1000
    while True:
        best = min(_spin_time(n) for _ in range(5))
        if best >= work_s / 4:
            return max(1, int(n * work_s / best))
        n *= 2


def _spin_time(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def probe(cpu: int, period_s: float = PERIOD_S, work_s: float = WORK_S) -> None:
    """Run until the process that started it is gone (or it is killed); print slow
    periods. A real-time probe must never outlive a bench that died."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {cpu})
    realtime = True
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        realtime = False
    n = _calibrate(work_s)
    print(f"READY stall cpu={cpu} realtime={int(realtime)} loops={n}", flush=True)
    out = sys.stdout
    slow = work_s * SLOW_FACTOR
    parent = os.getppid()
    next_at = time.perf_counter()
    while os.getppid() == parent:  # re-parented: the bench is gone
        t0 = time.perf_counter()
        x = 0
        for i in range(n):
            x += i
        t1 = time.perf_counter()
        if t1 - t0 >= slow:
            out.write(f"{t0:.6f} {t1:.6f}\n")
            out.flush()
        next_at += period_s
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.perf_counter()  # fell behind (a stall): start afresh


@dataclass
class Stalls:
    """Slow probe periods from every CPU, as (start, end), in arrival order."""

    periods: list[tuple[float, float]] = field(default_factory=list)
    realtime: bool = True

    def within(self, t0: float, t1: float) -> list[tuple[float, float]]:
        return [(a, b) for a, b in self.periods if b >= t0 and a <= t1]

    def windows(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """Merged stall windows touching [t0, t1], each widened by BEFORE_S and AFTER_S."""
        spans = sorted((a - BEFORE_S, b + AFTER_S) for a, b in self.within(t0 - AFTER_S,
                                                                           t1 + BEFORE_S))
        merged: list[tuple[float, float]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def summary(self, t0: float, t1: float) -> dict[str, float | int]:
        """Stall time (the slow periods, CPUs overlapping counted once) and windows."""
        spans = sorted((max(a, t0), min(b, t1)) for a, b in self.within(t0, t1))
        total = 0.0
        end = t0
        for a, b in spans:
            if b > end:
                total += b - max(a, end)
                end = b
        return {"stall_ms": round(total * 1000, 1), "stall_windows": len(self.windows(t0, t1))}


def away_from(windows: list[tuple[float, float]], starts: list[float]) -> list[bool]:
    """For each start: True if it lies outside every window."""
    lefts = [a for a, _ in windows]
    out = []
    for s in starts:
        i = bisect.bisect_right(lefts, s) - 1
        out.append(not (i >= 0 and windows[i][0] <= s <= windows[i][1]))
    return out


class StallProbes:
    """One probe process per CPU, read in the background."""

    def __init__(self) -> None:
        self.stalls = Stalls()
        self._procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, env: dict[str, str] | None = None) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        for cpu in cpus:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.stall", "--cpu", str(cpu),
                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=env)
            assert proc.stdout is not None
            self._procs.append(proc)  # stopped by `stop` even if it never gets ready
            ready = await asyncio.wait_for(proc.stdout.readline(), 30)
            if b"realtime=0" in ready:
                self.stalls.realtime = False
            self._readers.append(asyncio.get_running_loop().create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            a, b = line.split()
            self.stalls.periods.append((float(a), float(b)))

    async def stop(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for task in self._readers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__)
    p.add_argument("--cpu", type=int, required=True)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        probe(args.cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
