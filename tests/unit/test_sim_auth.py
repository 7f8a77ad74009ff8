"""The simulated gateway's token and AK/SK checks, with a fake clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from orchestrator.cloud.signer import sign_request
from orchestrator.simulator.auth import GatewayAuth
from orchestrator.simulator.scenario import AuthSpec

PROJECT = "054e292c9880d4992f02c0196d3ea468"
T0 = 1_700_000_000.0
URL = f"https://sim.example:8443/v3/{PROJECT}/jobs?id=abc&x=a%20b"
PATH = f"/v3/{PROJECT}/jobs"
QUERY = [("id", "abc"), ("x", "a b")]
SK = "sk-very-secret-value"


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def gateway(**spec: Any) -> tuple[GatewayAuth, FakeClock]:
    clock = FakeClock()
    tokens = iter(f"tok-{i}" for i in range(100))
    return GatewayAuth(
        AuthSpec.model_validate(spec), PROJECT, clock=clock, new_token=lambda: next(tokens)
    ), clock


def iam_body(user: str = "ops", password: str = "pa55word", domain: str = "acme") -> dict[str, Any]:
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": user, "password": password, "domain": {"name": domain}}},
            },
            "scope": {"project": {"id": PROJECT}},
        }
    }


def check(gw: GatewayAuth, headers: dict[str, str], body: bytes = b"") -> str | None:
    denial = gw.check("GET", PATH, QUERY, headers, body)
    return None if denial is None else denial.reason


def test_mode_none_accepts_anything() -> None:
    gw, _ = gateway()
    assert check(gw, {}) is None


def test_static_and_issued_tokens_until_expiry() -> None:
    gw, clock = gateway(
        mode="token",
        tokens=["static"],
        users=[{"name": "ops", "domain": "acme", "password": "pa55word"}],
        token_lifetime_s=3600,
    )
    assert check(gw, {"X-Auth-Token": "static"}) is None
    assert check(gw, {}) == "no_credentials"
    assert check(gw, {"x-auth-token": "forged"}) == "bad_token"
    reply = gw.issue_token(iam_body())
    assert reply.status == 201 and reply.headers["X-Subject-Token"] == "tok-0"
    assert reply.body["token"]["project"]["id"] == PROJECT
    expires = datetime.strptime(reply.body["token"]["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert expires.replace(tzinfo=UTC).timestamp() == T0 + 3600
    assert check(gw, {"X-Auth-Token": "tok-0"}) is None
    clock.now = T0 + 3600
    assert check(gw, {"X-Auth-Token": "tok-0"}) == "expired_token"
    assert (gw.token_issues, gw.auth_failures) == (1, 3)


def test_bad_password_is_refused_without_echoing_it() -> None:
    gw, _ = gateway(mode="token", users=[{"name": "ops", "domain": "acme", "password": "pa55word"}])
    reply = gw.issue_token(iam_body(password="wrong-secret-guess"))
    assert reply.status == 401 and "wrong-secret-guess" not in json.dumps(reply.body)
    assert gw.issue_token(iam_body(domain="other")).status == 401
    assert gw.issue_token({"auth": {}}).status == 400
    assert gw.token_issues == 0


def _signed(sk: str = SK, ak: str = "AK1", when: float = T0, body: bytes = b"") -> dict[str, str]:
    now = datetime.fromtimestamp(when, UTC)
    return sign_request(
        ak, sk, "GET", URL, {"Content-Type": "application/json"}, body, now=now, project_id=PROJECT
    )


def aksk_gateway(**extra: Any) -> tuple[GatewayAuth, FakeClock]:
    return gateway(mode="aksk", keys=[{"ak": "AK1", "sk": SK}], **extra)


def test_aksk_accepts_a_good_signature_and_refuses_tampering() -> None:
    gw, _ = aksk_gateway()
    assert check(gw, _signed()) is None
    assert check(gw, _signed(body=b"{}"), body=b"{}") is None
    assert check(gw, _signed(), body=b"{}") == "bad_signature"
    assert check(gw, _signed(sk="other")) == "bad_signature"
    assert check(gw, _signed(ak="AK2")) == "unknown_ak"
    assert check(gw, {"Authorization": "Basic xyz"}) == "bad_authorization"
    assert check(gw, {"X-Auth-Token": "t"}) == "no_credentials"
    assert gw.check("GET", PATH, [("id", "abd"), ("x", "a b")], _signed(), b"") is not None


def test_aksk_clock_skew() -> None:
    gw, _ = aksk_gateway()
    assert check(gw, _signed(when=T0 - 14 * 60)) is None
    assert check(gw, _signed(when=T0 - 16 * 60)) == "clock_skew"
    assert check(gw, _signed(when=T0 + 16 * 60)) == "clock_skew"


def test_five_bad_signatures_in_a_row_lock_the_key_for_lock_s() -> None:
    gw, clock = aksk_gateway(lock_s=300)
    for _ in range(4):
        assert check(gw, _signed(sk="bad")) == "bad_signature"
    assert check(gw, _signed()) is None  # a good one resets the streak
    for _ in range(5):
        assert check(gw, _signed(sk="bad")) == "bad_signature"
    assert check(gw, _signed()) == "locked_ak"
    denial = gw.check("GET", PATH, QUERY, _signed(), b"")
    assert denial is not None and "locked" in denial.reply().body["error_msg"]
    assert denial.reply().body["error_code"] == "APIGW.0301"
    clock.now = T0 + 301
    assert check(gw, _signed(when=clock.now)) is None


def test_any_mode_takes_either_and_secrets_stay_out_of_repr() -> None:
    gw, _ = gateway(
        mode="any",
        tokens=["static-tok"],
        keys=[{"ak": "AK1", "sk": SK}],
        users=[{"name": "u", "domain": "d", "password": "pw-secret"}],
    )
    assert check(gw, {"X-Auth-Token": "static-tok"}) is None
    assert check(gw, _signed()) is None
    shown = repr(gw) + repr(gw.spec) + str(gw.spec.model_dump())
    for secret in (SK, "static-tok", "pw-secret"):
        assert secret not in shown
