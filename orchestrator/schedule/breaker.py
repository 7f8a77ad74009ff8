"""The failure breaker: ``--max-failures N`` or ``P%``.

Semantics are Ansible's ``max_fail_percentage`` and AWS SSM's ``MaxErrors``: the breaker trips when the
failures **exceed** the limit, so ``--max-failures 2`` tolerates two failures and trips on the third, and
``--max-failures 0`` trips on the first. A percentage is of the jobs finished so far (succeeded, skipped,
flagged or failed), computed exactly: 10% of 25 finished allows 2 failures (2.5 rounded down, since 3
exceeds 2.5). Which outcomes count as a failure is the policy's (each rule's ``counts``); this module
only compares numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_EXAMPLE = "e.g. 2 or 10%"


@dataclass(frozen=True)
class Breaker:
    """A failure limit: exactly one of ``count`` (failures) or ``percent`` (0-100, of jobs finished)."""

    count: int | None = None
    percent: Fraction | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("a breaker has either a count or a percentage")
        if self.count is not None and self.count < 0:
            raise ValueError(f"negative failure limit {self.count}")
        if self.percent is not None and not 0 <= self.percent <= 100:
            raise ValueError(f"failure percentage {self.percent} is outside 0-100")

    def allowed(self, finished: int) -> int:
        """The most failures that do not exceed the limit when ``finished`` jobs have finished."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.floor(self.percent * max(finished, 0) / 100)

    def exceeded(self, failures: int, finished: int) -> bool:
        """True when ``failures`` is strictly greater than the limit (``N``, or ``P%`` of ``finished``)."""
        return failures > self.allowed(finished)

    def spec(self) -> str:
        """The limit as typed, normalised (``"2"``, ``"10%"``); ``parse_max_failures(b.spec()) == b``."""
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        value = Decimal(self.percent.numerator) / Decimal(self.percent.denominator)
        return f"{value.normalize():f}%"

    def describe(self, failures: int, finished: int) -> str:
        """One line for reasons and ``status``: ``"3 failures exceed the limit of 2"``, ``"1 failure is
        within the limit of 2"``, ``"3 failures exceed 10% of 20 finished jobs (2)"``."""
        noun = "failure" if failures == 1 else "failures"
        verb = (
            ("exceeds" if failures == 1 else "exceed")
            if self.exceeded(failures, finished)
            else ("is within" if failures == 1 else "are within")
        )
        if self.count is not None:
            return f"{failures} {noun} {verb} the limit of {self.count}"
        jobs = "job" if finished == 1 else "jobs"
        return (
            f"{failures} {noun} {verb} {self.spec()} of {finished} finished {jobs} ({self.allowed(finished)})"
        )


def parse_max_failures(text: str | int) -> Breaker:
    """Parse ``--max-failures``: a whole number >= 0 (``"2"``) or a percentage 0-100 (``"10%"``,
    ``"2.5%"``). Raises ``ValueError`` naming the input otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"cannot read failure limit {text!r}; expected {_EXAMPLE}")
    raw = str(text).strip()
    if raw.endswith("%"):
        try:
            percent = Fraction(Decimal(raw[:-1].strip()))
        except (InvalidOperation, ValueError) as exc:
            raise ValueError(f"cannot read failure limit {raw!r}; expected {_EXAMPLE}") from exc
        if not 0 <= percent <= 100:
            raise ValueError(f"failure limit {raw!r} is out of range; a percentage is 0% to 100%")
        return Breaker(percent=percent)
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"cannot read failure limit {raw!r}; expected a count or a percentage, {_EXAMPLE}")
    return Breaker(count=int(raw))
