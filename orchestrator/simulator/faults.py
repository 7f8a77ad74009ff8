"""Seeded fault injection: which call gets which failure, and what that failure looks like on the wire.

Faults are drawn from their own RNG (seeded from the scenario seed), one draw per call in scope, so a
given seed and call order always hurts the same calls: a chaos test that fails can be replayed.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from orchestrator.simulator.fleet import Reply, error_reply
from orchestrator.simulator.scenario import FAULT_NAMES, FaultName, FaultSpec

# Faults that change nothing in the fleet: the app answers (or drops) without asking the fleet.
BEFORE: frozenset[str] = frozenset(
    {"http_500", "http_503", "http_429", "busy_409", "timeout", "reset_before", "malformed_before"}
)
# Faults applied after the fleet has acted (an upgrade is really applied, then the answer is lost).
AFTER: frozenset[str] = frozenset({"timeout_after", "reset_after", "malformed_after"})
HANGS: frozenset[str] = frozenset({"timeout", "timeout_after"})
RESETS: frozenset[str] = frozenset({"reset_before", "reset_after"})
MALFORMED: frozenset[str] = frozenset({"malformed_before", "malformed_after"})
# Faults a route cannot have: IAM never answers "another operation is running on the instance".
NOT_ON_ROUTE: dict[str, frozenset[str]] = {"token": frozenset({"busy_409"})}

MALFORMED_BODIES: tuple[tuple[str, bytes], ...] = (
    ("application/json", b'{"update_result": [{"workflow_id": "3f2a'),  # truncated JSON
    ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),  # a proxy's error page
    ("application/json", b'{"update_result": {"state": "ACCEPT"}}'),  # valid JSON, wrong shape
    ("application/json", b'{"result": "ok"}'),  # valid JSON, unknown shape
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One drawn fault: its kind (a ``FaultSpec`` field name) and the variant that picks its details."""

    kind: FaultName
    variant: int  # picks the busy code / malformed body, drawn with the fault for reproducibility


class FaultInjector:
    """Draws at most one fault per call for routes the spec covers; swap the spec with ``replace``."""

    def __init__(self, spec: FaultSpec, seed: int) -> None:
        self.spec = spec
        self._rng = random.Random(f"{seed}:faults")
        self.injected: dict[str, int] = {}

    def replace(self, spec: FaultSpec) -> None:
        """Use ``spec`` for later draws (``/_sim/patch``)."""
        self.spec = spec  # keep the RNG: the sequence continues, reproducible for the same patch order

    def draw(self, route: str) -> Fault | None:
        """The fault for one call of ``route``, or None. Every call of a covered route takes one draw
        (even one whose fault cannot happen on that route), so a seed replays the same faults."""
        if not self.spec.covers(route):
            return None
        u, variant = self._rng.random(), self._rng.randrange(1 << 16)
        cumulative = 0.0
        for name in FAULT_NAMES:
            cumulative += getattr(self.spec, name)
            if u < cumulative:
                if name in NOT_ON_ROUTE.get(route, ()):
                    return None  # drawn all the same, so the other routes' faults stay reproducible
                self.injected[name] = self.injected.get(name, 0) + 1
                return Fault(name, variant)
        return None


def fault_reply(fault: Fault, spec: FaultSpec) -> Reply | None:
    """The HTTP answer of an error fault, or None for faults that are not an error answer."""
    if fault.kind == "http_500":
        return error_reply(500, "DBS.05000000", "Server error. Try again later.")
    if fault.kind == "http_503":
        return error_reply(503, "APIGW.0202", "Service unavailable: the backend is busy.")
    if fault.kind == "http_429":
        return throttled_reply(spec)
    if fault.kind == "busy_409":
        code = spec.busy_codes[fault.variant % len(spec.busy_codes)]
        return error_reply(409, code, "Another operation is running on the instance. Try again later.")
    return None


def throttled_reply(spec: FaultSpec, limit: int | None = None) -> Reply:
    """The gateway's throttling answer: 429 ``APIGW.0308`` with the documented message ("limit:N,
    time:1 second", N = ``limit`` or the spec's) and ``Retry-After`` when the spec sets one
    (docs/api-contract.md, Rate limiting; 429 is inferred there)."""
    reply = error_reply(
        429,
        "APIGW.0308",
        "The throttling threshold has been reached: policy user over ratelimit, "
        f"limit:{limit or spec.rate_limit}, time:1 second",
    )
    if spec.retry_after_s is not None:
        reply.headers["Retry-After"] = str(spec.retry_after_s)
    return reply


def malformed_reply(fault: Fault) -> Reply:
    """A 200 whose body is not the documented shape (truncated JSON, an HTML page, the wrong or an
    unknown shape), picked by the fault's variant."""
    content_type, raw = MALFORMED_BODIES[fault.variant % len(MALFORMED_BODIES)]
    return Reply(200, None, {"Content-Type": content_type}, raw=raw)


class GatewayThrottle:
    """A real per-second limit (sliding one-second window), like the gateway's per-user policy."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._recent: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Whether a call at ``now`` (seconds) fits the limit; an allowed call is counted."""
        if self.limit is None:
            return True
        while self._recent and self._recent[0] <= now - 1.0:
            self._recent.popleft()
        if len(self._recent) >= self.limit:
            return False
        self._recent.append(now)
        return True
