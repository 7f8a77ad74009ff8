"""Seeded fault injection and the gateway throttle."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from orchestrator.simulator.faults import (
    MALFORMED_BODIES,
    Fault,
    FaultInjector,
    GatewayThrottle,
    fault_reply,
    malformed_reply,
)
from orchestrator.simulator.scenario import FaultSpec


def _sequence(seed: int, spec: FaultSpec, n: int = 500) -> list[str | None]:
    injector = FaultInjector(spec, seed)
    return [f.kind if (f := injector.draw("upgrade")) else None for _ in range(n)]


def test_same_seed_same_faults_different_seed_different_faults() -> None:
    spec = FaultSpec(http_503=0.1, reset_after=0.05, timeout=0.02)
    assert _sequence(1, spec) == _sequence(1, spec)
    assert _sequence(1, spec) != _sequence(2, spec)


def test_frequencies_follow_the_probabilities() -> None:
    spec = FaultSpec(http_500=0.1, http_429=0.2, malformed_after=0.05)
    counts = Counter(_sequence(4, spec, 10_000))
    assert 850 < counts["http_500"] < 1150
    assert 1800 < counts["http_429"] < 2200
    assert 380 < counts["malformed_after"] < 620
    assert set(counts) == {None, "http_500", "http_429", "malformed_after"}


def test_routes_limit_where_faults_fall_and_do_not_consume_draws() -> None:
    spec = FaultSpec(http_500=1.0)
    injector = FaultInjector(spec, 1)
    assert injector.draw("job") is None
    assert injector.draw("upgrade") == Fault("http_500", injector_variant(spec, 1))
    everywhere = FaultInjector(FaultSpec(http_500=1.0, routes=["all"]), 1)
    assert everywhere.draw("job") is not None and everywhere.draw("token") is not None
    assert everywhere.injected == {"http_500": 2}


def injector_variant(spec: FaultSpec, seed: int) -> int:
    fault = FaultInjector(spec, seed).draw("upgrade")
    assert fault is not None
    return fault.variant


def test_replace_ends_a_storm() -> None:
    injector = FaultInjector(FaultSpec(http_503=1.0), 9)
    assert injector.draw("upgrade") is not None
    injector.replace(FaultSpec())
    assert all(injector.draw("upgrade") is None for _ in range(100))


def test_error_replies() -> None:
    spec = FaultSpec(retry_after_s=3, rate_limit=20, busy_codes=["DBS.200019", "DBS.201014"])
    throttled = fault_reply(Fault("http_429", 0), spec)
    assert throttled is not None and throttled.status == 429
    assert throttled.body == {
        "error_code": "APIGW.0308",
        "error_msg": "The throttling threshold has been reached: policy user over ratelimit, limit:20, "
        "time:1 second",
    }
    assert throttled.headers["Retry-After"] == "3"
    busy = [fault_reply(Fault("busy_409", v), spec) for v in (0, 1)]
    assert [(b.status, b.body["error_code"]) for b in busy if b] == [(409, "DBS.200019"), (409, "DBS.201014")]
    server = fault_reply(Fault("http_500", 0), spec)
    assert server is not None and (server.status, server.body["error_code"]) == (500, "DBS.05000000")
    no_header = fault_reply(Fault("http_429", 0), FaultSpec(retry_after_s=None))
    assert no_header is not None and "Retry-After" not in no_header.headers
    assert fault_reply(Fault("reset_after", 0), spec) is None


@pytest.mark.parametrize("variant", range(len(MALFORMED_BODIES)))
def test_malformed_bodies_are_not_a_valid_update_result(variant: int) -> None:
    reply = malformed_reply(Fault("malformed_after", variant))
    assert reply.status == 200 and reply.raw is not None
    try:
        parsed = json.loads(reply.raw)
    except ValueError:
        return
    assert not isinstance(parsed.get("update_result"), list)


def test_gateway_throttle_sliding_second() -> None:
    throttle = GatewayThrottle(3)
    assert [throttle.allow(t) for t in (0.0, 0.1, 0.2, 0.3)] == [True, True, True, False]
    assert throttle.allow(1.05)  # 0.0 left the window
    assert not throttle.allow(1.06)
    assert GatewayThrottle(None).allow(0.0)
