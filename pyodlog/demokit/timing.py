"""Paired-rotation timing: how much slower one call is than another, measured fairly.

Timing the bare model for a while and then the logged model for a while puts the
machine's drift (other processes, frequency scaling, caches) between the two. Here
every *rotation* calls each variant once, back to back, on the same inputs, in an
order that alternates from one rotation to the next (so neither variant always
runs first); warm-up rotations are not timed. The ratio of two variants is taken
per rotation (a *paired* ratio), and reported as the median of those ratios with
their interquartile range: drift common to a rotation cancels in its ratio.

Used by ``make demo`` (:mod:`pyodlog.demo`) and ``benchmarks/overhead_paired.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedTimes:
    """Seconds per call of each variant, one entry per timed rotation (index ``i`` = rotation ``i``)."""

    times: dict[str, list[float]]
    warmup: int

    @property
    def rotations(self) -> int:
        """How many rotations were timed."""
        return len(next(iter(self.times.values()), []))

    def median(self, key: str) -> float:
        """The median seconds per call of ``key``."""
        return statistics.median(self.times[key])

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """Per rotation, ``numerator``'s time over ``denominator``'s time of the same rotation."""
        return [a / b for a, b in zip(self.times[numerator], self.times[denominator])]

    def ratio(self, numerator: str, denominator: str) -> RatioSummary:
        """The paired ratios of ``numerator`` over ``denominator``, summarised."""
        return RatioSummary.of(self.ratios(numerator, denominator))


@dataclass(frozen=True)
class RatioSummary:
    """Median and quartiles of paired ratios."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, ratios: list[float]) -> RatioSummary:
        """The summary of ``ratios`` (at least one); quartiles by the inclusive method."""
        if not ratios:
            raise ValueError("no ratios to summarise: time at least one rotation")
        if len(ratios) == 1:
            return cls(ratios[0], ratios[0], ratios[0], 1)
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(median, q1, q3, len(ratios))

    def __str__(self) -> str:
        return f"x{self.median:.3f} (IQR {self.q1:.3f}-{self.q3:.3f}, {self.n} paired calls)"


def paired_rotation(
    calls: Mapping[str, Callable[[], object]],
    rotations: int,
    *,
    warmup: int = 2,
    min_rotations: int | None = None,
    time_budget_s: float | None = None,
    alternate: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTimes:
    """Times every call of ``calls`` once per rotation, for up to ``rotations`` rotations.

    Args:
        calls: name → a callable without arguments (close over the same inputs).
        rotations: the most rotations to time.
        warmup: untimed rotations first (lazy initialisation, caches, allocator).
        min_rotations: with ``time_budget_s``, time at least this many rotations
            (default ``min(rotations, 5)``).
        time_budget_s: stop starting new rotations once this many seconds (by
            ``clock``) went into the timed rotations, after ``min_rotations``.
        alternate: reverse the order of the calls on every other rotation.
        clock: the clock (seconds), ``time.perf_counter`` by default.

    Returns:
        The per-rotation times of every call.
    """
    if not calls:
        raise ValueError("paired_rotation needs at least one call to time")
    if rotations < 1 or warmup < 0:
        raise ValueError(f"rotations must be >= 1 and warmup >= 0, got {rotations} and {warmup}")
    keys = list(calls)
    for _ in range(warmup):
        for key in keys:
            calls[key]()
    floor = min(rotations, 5) if min_rotations is None else min(min_rotations, rotations)
    times: dict[str, list[float]] = {key: [] for key in keys}
    spent = 0.0
    for rotation in range(rotations):
        if time_budget_s is not None and rotation >= floor and spent >= time_budget_s:
            break
        order = keys[::-1] if alternate and rotation % 2 else keys
        for key in order:
            start = clock()
            calls[key]()
            elapsed = clock() - start
            times[key].append(elapsed)
            spent += elapsed
    return PairedTimes(times, warmup)
