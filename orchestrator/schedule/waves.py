"""Canary waves: ``--waves 1,5,25%,100%`` and the order in which jobs fill them.

The spec follows Ansible's ``serial`` list: each entry is a count of proxies or a percentage of the whole
fleet, and the last entry repeats until every job has a wave. One deliberate difference: Ansible's
``pct_to_int`` truncates a percentage (``int(pct / 100 * total) or 1``), we round it **up**, so ``25%`` of
10 proxies is 3 and a wave never holds less than the share the operator wrote. Percentages are exact
(``Fraction``), so ``10%`` of 30 is 3, not 3.0000000000000004 rounded up to 4.

Ordering (``--order``) decides which jobs fall into the early waves:
- ``inventory``: the order the rows are given in (the inventory's order).
- ``shuffle``: a seeded pseudo-random order: the rows sorted by (instance, proxy), then a Fisher-Yates
  shuffle drawing from ``random.Random(seed).random()`` (the one sequence Python promises to reproduce
  for a seed across versions). The same seed and keys give the same order on every machine, whatever
  ``PYTHONHASHSEED`` or the input order. The seed is stored with the run.
- ``instance``: grouped by instance key (ascending), so one instance's proxies take consecutive positions;
  within an instance the input order is kept.

Pure functions; 100,000 rows order in well under a second.
"""

from __future__ import annotations

import enum
import math
import random
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TypeVar

_EXAMPLE = "e.g. 1,5,25%,100%"
JobId = TypeVar("JobId")


class WaveOrder(enum.StrEnum):
    """``--order``: which jobs fill the early waves (see the module docstring)."""

    INVENTORY = "inventory"
    SHUFFLE = "shuffle"
    INSTANCE = "instance"


@dataclass(frozen=True)
class WaveStep:
    """One entry of the spec: ``count`` proxies, or ``percent`` (0 < percent <= 100) of the fleet."""

    count: int | None = None
    percent: Fraction | None = None

    def size(self, total: int) -> int:
        """Jobs in a wave of this step for a fleet of ``total`` jobs (at least 1; not capped at what is
        left: ``WaveSpec.sizes`` does that)."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.ceil(self.percent * total / 100))

    def describe(self) -> str:
        """The entry in the ``--waves`` form, normalised: ``5``, ``25%``, ``12.5%``."""
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        value = Decimal(self.percent.numerator) / Decimal(self.percent.denominator)
        return f"{value.normalize():f}%"


@dataclass(frozen=True)
class WaveSpec:
    """A parsed ``--waves`` list (at least one step)."""

    steps: tuple[WaveStep, ...]

    def sizes(self, total: int) -> list[int]:
        """Wave sizes for ``total`` jobs: ``[1, 5, 25, 25, 25, 19]`` for ``1,5,25%`` and 100 jobs. Sums to
        ``total``; empty for 0. Raises ``ValueError`` for a negative total."""
        if total < 0:
            raise ValueError(f"negative job count {total}")
        sizes: list[int] = []
        left = total
        while left > 0:
            step = self.steps[min(len(sizes), len(self.steps) - 1)]
            size = min(step.size(total), left)
            sizes.append(size)
            left -= size
        return sizes

    def describe(self) -> str:
        """The spec normalised (``"1,5,25%,100%"``); ``parse_waves(s.describe()) == s``."""
        return ",".join(step.describe() for step in self.steps)


ALL_AT_ONCE = WaveSpec((WaveStep(percent=Fraction(100)),))
"""The spec of a run without ``--waves``: one wave holding every job."""


def parse_waves(spec: str | Sequence[str | int]) -> WaveSpec:
    """Parse ``"1,5,25%,100%"`` (or the same as a YAML list, ``[1, 5, "25%"]``).

    Counts are whole numbers >= 1; percentages are > 0 and <= 100 and may have decimals (``12.5%``).
    Raises ``ValueError`` naming the bad entry.
    """
    items: list[str | int] = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or items == [""]:
        raise ValueError(f"empty wave list; expected {_EXAMPLE}")
    return WaveSpec(tuple(_parse_step(item) for item in items))


def _parse_step(item: str | int) -> WaveStep:
    if isinstance(item, bool):
        raise ValueError(f"wave size {item!r} is not a count or a percentage; expected {_EXAMPLE}")
    text = str(item) if isinstance(item, int) else item.strip()
    if text.endswith("%"):
        try:
            percent = Fraction(Decimal(text[:-1].strip()))
        except (InvalidOperation, ValueError) as exc:
            raise ValueError(f"cannot read wave size {text!r}; expected {_EXAMPLE}") from exc
        if not 0 < percent <= 100:
            raise ValueError(f"wave size {text!r} is out of range; a percentage is above 0% and at most 100%")
        return WaveStep(percent=percent)
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"cannot read wave size {text!r}; expected a count or a percentage, {_EXAMPLE}")
    count = int(text)
    if count < 1:
        raise ValueError(f"wave size {text!r} is out of range; a wave holds at least 1 proxy")
    return WaveStep(count=count)


def wave_numbers(total: int, spec: WaveSpec) -> Iterator[int]:
    """The 1-based wave number of each position ``0..total-1`` in wave order."""
    for number, size in enumerate(spec.sizes(total), start=1):
        for _ in range(size):
            yield number


def order_keys(
    rows: Iterable[tuple[JobId, str, str]], order: WaveOrder | str, seed: int | str = 0
) -> list[JobId]:
    """Job ids in wave order.

    ``rows`` are ``(job_id, instance_key, proxy_key)`` in inventory order; ``order`` is a ``WaveOrder``
    or its value; ``seed`` matters only for ``shuffle``. Raises ``ValueError`` for an unknown order.
    """
    how = WaveOrder(order)
    listed = list(rows)
    if how is WaveOrder.INVENTORY:
        return [row[0] for row in listed]
    if how is WaveOrder.INSTANCE:
        # sorted() is stable: within an instance the inventory order stays.
        return [row[0] for row in sorted(listed, key=lambda row: row[1])]
    # Canonical order first (instance, proxy; input position breaks ties), so the input order does not
    # matter; then Fisher-Yates driven by Random.random(), whose sequence for a given seed Python promises
    # to keep across versions (shuffle() itself carries no such promise).
    canonical = sorted(range(len(listed)), key=lambda i: (listed[i][1], listed[i][2], i))
    rng = random.Random(seed)
    for i in range(len(canonical) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        canonical[i], canonical[j] = canonical[j], canonical[i]
    return [listed[i][0] for i in canonical]


def assign_waves(
    rows: Iterable[tuple[JobId, str, str]], spec: WaveSpec, order: WaveOrder | str, seed: int | str = 0
) -> list[tuple[JobId, int]]:
    """``(job_id, wave)`` for every row: ``order_keys`` then ``wave_numbers``, what a run stores once."""
    ordered = order_keys(rows, order, seed)
    return list(zip(ordered, wave_numbers(len(ordered), spec), strict=True))


def new_seed() -> int:
    """A fresh shuffle seed (31 bits, so it fits any integer column) for a run that gave none."""
    return secrets.randbelow(2**31)
