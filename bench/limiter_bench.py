"""Compare start-rate limiters the way the engine uses them: N bounded workers, one limiter, real clock.

For each scenario (rate x workers) every limiter drives the same pool of workers that loop
``acquire(); await call()`` for a fixed time on a fresh event loop. From the recorded start timestamps
the bench computes, exactly, the most starts in any sliding window ``[t, t + period)`` (as sent, and as a
server would see them after random arrival jitter), plus the achieved rate, CPU seconds
(``time.process_time``) and fairness (max wait / mean wait). CPU is reported as a ratio against our
limiter in the same scenario of the same run, never as an absolute pass/fail, because this machine is
shared and its speed varies.

Run: ``python bench/limiter_bench.py`` (about 70 s) or ``--quick`` (about 15 s). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiolimiter import AsyncLimiter

from orchestrator.limiter import (
    DEFAULT_MARGIN_S,
    Rate,
    SlidingWindowLimiter,
    ThrottleAdapter,
    parse_rate,
)

BASELINE = "ours"


class _Acquirer(Protocol):
    async def acquire(self) -> None: ...


class _AiolimiterAdapter:
    """aiolimiter's leaky bucket; ``AsyncLimiter(count, period)`` or, smoothed, ``(1, period / count)``."""

    def __init__(self, max_rate: float, time_period: float) -> None:
        self._limiter = AsyncLimiter(max_rate, time_period)

    async def acquire(self) -> None:
        await self._limiter.acquire()


LIMITERS: dict[str, Callable[[Rate], _Acquirer]] = {
    "asyncio-throttle": lambda rate: ThrottleAdapter(rate),
    "aiolimiter": lambda rate: _AiolimiterAdapter(rate.count, rate.period),
    "aiolimiter-smooth": lambda rate: _AiolimiterAdapter(1, rate.period / rate.count),
    "ours": lambda rate: SlidingWindowLimiter(rate),
}


@dataclass(frozen=True)
class Scenario:
    rate: Rate
    workers: int
    duration: float

    @property
    def label(self) -> str:
        return f"{self.rate.count}/{self.rate.period:g}s, {self.workers} workers, {self.duration:g} s"


@dataclass
class Result:
    scenario: str
    limiter: str
    starts: int
    max_window: int
    max_window_jittered: int
    first_window: int
    achieved_per_s: float
    cpu_s: float
    cpu_per_wall: float
    cpu_vs_baseline: float
    mean_wait_s: float
    max_wait_s: float
    fairness: float  # max wait / mean wait
    worker_share: str  # fewest..most starts of one worker, when each could get several


def max_in_window(starts: Sequence[float], period: float) -> int:
    """Most starts in any half-open window [x, x + period); the worst window begins at a start."""
    ordered = sorted(starts)
    best = 0
    j = 0
    for i, first in enumerate(ordered):
        j = max(j, i)
        while j < len(ordered) and ordered[j] < first + period:
            j += 1
        best = max(best, j - i)
    return best


async def _drive(
    limiter: _Acquirer, workers: int, duration: float, call_s: float
) -> list[tuple[int, float, float]]:
    """Bounded workers looping acquire -> call until the deadline; returns (worker, requested, granted)."""
    record: list[tuple[int, float, float]] = []

    async def worker(n: int) -> None:
        while True:
            requested = time.monotonic()
            await limiter.acquire()
            record.append((n, requested, time.monotonic()))
            await asyncio.sleep(call_s)

    tasks = [asyncio.create_task(worker(n)) for n in range(workers)]
    await asyncio.sleep(duration)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return record


def run_one(name: str, scenario: Scenario, call_s: float, jitter_s: float, seed: int) -> Result:
    limiter = LIMITERS[name](scenario.rate)
    cpu0, wall0 = time.process_time(), time.monotonic()
    record = asyncio.run(_drive(limiter, scenario.workers, scenario.duration, call_s))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    period = scenario.rate.period
    starts = [granted for _, _, granted in record]
    waits = [granted - requested for _, requested, granted in record]
    per_worker = Counter(n for n, _, _ in record)
    shares = [per_worker.get(n, 0) for n in range(scenario.workers)]
    share = f"{min(shares)}..{max(shares)}" if len(starts) >= 4 * scenario.workers else "n/a"
    rng = random.Random(seed)
    jittered = [t + rng.uniform(0, jitter_s) for t in starts]
    t0 = min(starts) if starts else 0.0
    mean_wait = statistics.fmean(waits) if waits else 0.0
    return Result(
        scenario=scenario.label,
        limiter=name,
        starts=len(starts),
        max_window=max_in_window(starts, period),
        max_window_jittered=max_in_window(jittered, period),
        first_window=sum(1 for t in starts if t < t0 + period),
        achieved_per_s=len(starts) / scenario.duration,
        cpu_s=cpu,
        cpu_per_wall=cpu / wall,
        cpu_vs_baseline=float("nan"),
        mean_wait_s=mean_wait,
        max_wait_s=max(waits, default=0.0),
        fairness=(max(waits) / mean_wait) if mean_wait > 0 else float("nan"),
        worker_share=share,
    )


def render(results: list[Result], scenarios: list[Scenario], jitter_s: float) -> str:
    lines = [
        f"| scenario | limiter | starts | max in any window | with {jitter_s * 1000:g} ms jitter "
        "| 1st window | achieved /s | CPU s | CPU/wall | CPU vs ours | mean wait ms | max wait ms "
        "| max/mean wait | starts per worker |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for scenario in scenarios:
        for r in (r for r in results if r.scenario == scenario.label):
            limit = scenario.rate.count
            flag = "" if r.max_window <= limit else " **over**"
            jflag = "" if r.max_window_jittered <= limit else " **over**"
            lines.append(
                f"| {r.scenario} | {r.limiter} | {r.starts} | {r.max_window}{flag} "
                f"| {r.max_window_jittered}{jflag} | {r.first_window} | {r.achieved_per_s:.1f} "
                f"| {r.cpu_s:.2f} | {r.cpu_per_wall:.3f} | {r.cpu_vs_baseline:.2f} "
                f"| {r.mean_wait_s * 1000:.1f} | {r.max_wait_s * 1000:.0f} | {r.fairness:.1f} "
                f"| {r.worker_share} |"
            )
    return "\n".join(lines)


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    fast = parse_rate(args.rate)
    slow = parse_rate(args.slow_rate)
    result = [Scenario(fast, workers, args.duration) for workers in args.workers]
    result.append(Scenario(slow, args.slow_workers, args.slow_duration))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="200/s")
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 2000])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run at --rate")
    parser.add_argument("--slow-rate", default="10/s")
    parser.add_argument("--slow-workers", type=int, default=64)
    parser.add_argument("--slow-duration", type=float, default=5.0)
    parser.add_argument("--call-ms", type=float, default=0.0, help="the trivial call's await, in ms")
    parser.add_argument("--jitter-ms", type=float, default=10.0, help="server-side arrival jitter")
    parser.add_argument("--limiters", nargs="+", choices=sorted(LIMITERS), default=list(LIMITERS))
    parser.add_argument("--quick", action="store_true", help="1 s runs, 2 s at the slow rate")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.slow_duration = 1.0, 2.0
    names = list(dict.fromkeys([*args.limiters, BASELINE]))  # the baseline always runs, last
    names.remove(BASELINE)
    names.append(BASELINE)

    scenarios = _scenarios(args)
    results: list[Result] = []
    print(
        f"python {sys.version.split()[0]}, margin of ours {DEFAULT_MARGIN_S * 1000:g} ms, "
        f"call {args.call_ms:g} ms, jitter {args.jitter_ms:g} ms",
        file=sys.stderr,
    )
    for scenario in scenarios:
        for name in names:
            result = run_one(name, scenario, args.call_ms / 1000, args.jitter_ms / 1000, args.seed)
            results.append(result)
            print(
                f"{scenario.label:40} {name:18} starts={result.starts:6d} "
                f"max_window={result.max_window:5d} cpu={result.cpu_s:.2f}s",
                file=sys.stderr,
            )
        base = next(r for r in results if r.scenario == scenario.label and r.limiter == BASELINE)
        for r in results:
            if r.scenario == scenario.label:
                r.cpu_vs_baseline = r.cpu_s / base.cpu_s if base.cpu_s > 0 else float("nan")
    print(render(results, scenarios, args.jitter_ms / 1000))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    over = [
        f"{r.limiter} ({s.label})"
        for s in scenarios
        for r in results
        if r.scenario == s.label and r.max_window > s.rate.count
    ]
    print(f"\nexceeded the limit in some window: {over or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
