"""Credential providers without the network: selection from env, AK/SK headers, masking, pure helpers."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.cloud.auth import (
    AkSk,
    AuthError,
    Credentials,
    IamPassword,
    NoAuth,
    Scope,
    StaticToken,
    _Token,
    credentials_from_env,
    iam_error_message,
    iam_token_request_body,
    parse_expires_at,
    token_needs_renewal,
)
from orchestrator.cloud.redact import Secret, redact_headers, scrub
from orchestrator.cloud.signer import compute_signature, parse_authorization

PROJECT = "054e292c9880d4992f02c0196d3ea468"
SCOPE = Scope(
    project_id=PROJECT, region="cn-north-4", endpoint="https://gaussdb.cn-north-4.myhuaweicloud.com"
)
URL = f"{SCOPE.endpoint}/v3/{PROJECT}/jobs?id=abc"
SK = "SKverysecret0123456789"
PASSWORD = "Pa55-word!secret"
TOKEN = "MIIEXAMPLETOKENsecret"


# --- AK/SK ----------------------------------------------------------------------------------------


async def test_aksk_headers_verify_with_compute_signature() -> None:
    creds = AkSk("MYAK", SK, clock=lambda: datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    base = {"Content-Type": "application/json;charset=UTF-8"}
    extra = await creds.headers_for(SCOPE, "POST", URL, base, b"{}")
    assert set(extra) == {"X-Sdk-Date", "Host", "X-Project-Id", "Authorization"}
    assert extra["X-Sdk-Date"] == "20240101T000000Z"
    assert extra["X-Project-Id"] == PROJECT
    sent = {**base, **extra}
    ak, signed, signature = parse_authorization(sent["Authorization"])
    assert ak == "MYAK"
    path = f"/v3/{PROJECT}/jobs"
    assert compute_signature(SK, "POST", path, [("id", "abc")], sent, signed, b"{}") == signature
    assert compute_signature("wrong", "POST", path, [("id", "abc")], sent, signed, b"{}") != signature


async def test_aksk_date_is_fresh_on_each_call_and_401_is_final() -> None:
    now = [datetime(2024, 1, 1, tzinfo=UTC).timestamp()]
    creds = AkSk("MYAK", SK, security_token="STStoken", clock=lambda: now[0])
    first = await creds.headers_for(SCOPE, "GET", URL, {}, b"")
    now[0] += 61
    second = await creds.headers_for(SCOPE, "GET", URL, {}, b"")
    assert (first["X-Sdk-Date"], second["X-Sdk-Date"]) == ("20240101T000000Z", "20240101T000101Z")
    assert first["Authorization"] != second["Authorization"]
    assert second["X-Security-Token"] == "STStoken"
    assert "x-security-token" in parse_authorization(second["Authorization"])[1]
    assert await creds.on_unauthorized(SCOPE, {**second}) is False


async def test_static_token_and_no_auth() -> None:
    token = StaticToken(TOKEN)
    assert await token.headers_for(SCOPE, "GET", URL, {}, b"") == {"X-Auth-Token": TOKEN}
    assert await token.on_unauthorized(SCOPE, {"X-Auth-Token": TOKEN}) is False
    none = NoAuth()
    assert await none.headers_for(SCOPE, "GET", URL, {}, b"") == {}
    assert await none.on_unauthorized(SCOPE, {}) is False
    with pytest.raises(AuthError):
        StaticToken("  ")


def test_reprs_mask_every_secret() -> None:
    providers: list[Credentials] = [
        AkSk("MYAK", SK, security_token="STSsecrettoken"),
        StaticToken(TOKEN),
        IamPassword("alice", "acme", PASSWORD, iam_endpoint="http://127.0.0.1:1"),
        NoAuth(),
    ]
    for provider in providers:
        text = (
            repr(provider)
            + str(provider)
            + f"{provider}"
            + repr(vars(provider) if hasattr(provider, "__dict__") else "")
        )
        for secret in (SK, "STSsecrettoken", TOKEN, PASSWORD):
            assert secret not in text
    assert "MYAK" in repr(providers[0]) and "alice" in repr(providers[2]) and "acme" in repr(providers[2])
    assert [p.name for p in providers] == ["aksk", "token", "iam-password", "none"]
    assert all(isinstance(p, Credentials) for p in providers)


def test_secret_never_prints_or_pickles() -> None:
    secret = Secret(PASSWORD)
    assert secret.reveal() == PASSWORD
    assert PASSWORD not in f"{secret} {secret!r} {secret:>40} {[secret]} { ({'k': secret}) }"
    assert secret == Secret(PASSWORD) and secret != Secret("other") and secret != PASSWORD
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    token = _Token(Secret(TOKEN), 0.0, 10.0)
    assert TOKEN not in repr(token)


def test_redact_headers_masks_credential_headers_any_case() -> None:
    headers = {
        "X-Auth-Token": TOKEN,
        "authorization": "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=abc",
        "X-SECURITY-TOKEN": "sts",
        "X-Subject-Token": TOKEN,
        "Cookie": "session=1",
        "X-Request-Id": "req-1",
        "Content-Type": "application/json",
    }
    redacted = redact_headers(headers)
    assert redacted == {
        "X-Auth-Token": "***",
        "authorization": "***",
        "X-SECURITY-TOKEN": "***",
        "X-Subject-Token": "***",
        "Cookie": "***",
        "X-Request-Id": "req-1",
        "Content-Type": "application/json",
    }
    assert headers["X-Auth-Token"] == TOKEN  # a copy


def test_scrub() -> None:
    assert (
        scrub(f"user sent {PASSWORD} twice: {PASSWORD}", [Secret(PASSWORD), None, ""])
        == "user sent *** twice: ***"
    )


# --- selection from the environment -----------------------------------------------------------------

AKSK_ENV = {"HUAWEICLOUD_SDK_AK": "MYAK", "HUAWEICLOUD_SDK_SK": SK}
IAM_ENV = {
    "ORCHESTRATOR_IAM_USER": "alice",
    "ORCHESTRATOR_IAM_DOMAIN": "acme",
    "ORCHESTRATOR_IAM_PASSWORD": PASSWORD,
}
TOKEN_ENV = {"ORCHESTRATOR_AUTH_TOKEN": TOKEN}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({**AKSK_ENV, **IAM_ENV, **TOKEN_ENV}, AkSk),
        ({**IAM_ENV, **TOKEN_ENV}, IamPassword),
        (TOKEN_ENV, StaticToken),
        ({}, NoAuth),
        ({"HUAWEICLOUD_SDK_AK": "", "HUAWEICLOUD_SDK_SK": "", "ORCHESTRATOR_AUTH_TOKEN": ""}, NoAuth),
        ({"HUAWEICLOUD_SDK_PROJECT_ID": PROJECT}, NoAuth),
    ],
)
def test_env_precedence(env: dict[str, str], expected: type) -> None:
    assert type(credentials_from_env(env)) is expected


async def test_env_aksk_with_security_token() -> None:
    creds = credentials_from_env({**AKSK_ENV, "HUAWEICLOUD_SDK_SECURITY_TOKEN": "STStoken"})
    extra = await creds.headers_for(SCOPE, "GET", URL, {}, b"")
    assert extra["X-Security-Token"] == "STStoken"
    assert parse_authorization(extra["Authorization"])[0] == "MYAK"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HUAWEICLOUD_SDK_AK": "MYAK"}, "HUAWEICLOUD_SDK_SK"),
        ({"HUAWEICLOUD_SDK_SK": SK, **IAM_ENV}, "HUAWEICLOUD_SDK_AK"),
        ({"HUAWEICLOUD_SDK_SECURITY_TOKEN": "STStoken"}, "HUAWEICLOUD_SDK_AK"),
        (
            {"ORCHESTRATOR_IAM_USER": "alice", "ORCHESTRATOR_IAM_PASSWORD": PASSWORD},
            "ORCHESTRATOR_IAM_DOMAIN",
        ),
        ({"ORCHESTRATOR_IAM_USER": "alice", "ORCHESTRATOR_IAM_DOMAIN": "acme"}, "ORCHESTRATOR_IAM_PASSWORD"),
        ({**IAM_ENV, "ORCHESTRATOR_IAM_PASSWORD_FILE": "/nonexistent"}, "only one"),
        ({**TOKEN_ENV, "ORCHESTRATOR_IAM_PASSWORD": PASSWORD}, "ORCHESTRATOR_IAM_USER"),
    ],
)
def test_env_half_configured_is_an_error_naming_the_variable_not_the_value(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(AuthError) as info:
        credentials_from_env(env)
    assert named in str(info.value)
    for value in env.values():
        if value not in ("alice", "acme"):
            assert value not in str(info.value)


def test_env_password_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD + "\n", encoding="utf-8")
    env = {"ORCHESTRATOR_IAM_USER": "alice", "ORCHESTRATOR_IAM_DOMAIN": "acme"}
    creds = credentials_from_env({**env, "ORCHESTRATOR_IAM_PASSWORD_FILE": str(secret_file)})
    assert isinstance(creds, IamPassword)
    assert creds._password.reveal() == PASSWORD
    with pytest.raises(AuthError, match="cannot read"):
        credentials_from_env({**env, "ORCHESTRATOR_IAM_PASSWORD_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    with pytest.raises(AuthError, match="empty"):
        credentials_from_env({**env, "ORCHESTRATOR_IAM_PASSWORD_FILE": str(tmp_path / "empty")})


def test_env_iam_endpoint_override_is_passed_on() -> None:
    creds = credentials_from_env(IAM_ENV, iam_endpoint="http://127.0.0.1:8080/")
    assert isinstance(creds, IamPassword)
    assert creds.iam_base_url(SCOPE) == "http://127.0.0.1:8080"


# --- IAM pure helpers ---------------------------------------------------------------------------------


def test_iam_endpoint_resolution() -> None:
    default = IamPassword("u", "d", "p")
    assert default.iam_base_url(SCOPE) == "https://iam.cn-north-4.myhuaweicloud.com"
    with pytest.raises(AuthError, match="IAM endpoint"):
        default.iam_base_url(Scope(PROJECT, None, "http://127.0.0.1:9"))
    same_as_service = IamPassword("u", "d", "p", iam_endpoint=lambda scope: scope.endpoint)
    assert same_as_service.iam_base_url(SCOPE) == SCOPE.endpoint


def test_iam_request_body_matches_the_contract() -> None:
    assert iam_token_request_body("alice", "acme", PASSWORD, PROJECT) == {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": "alice", "password": PASSWORD, "domain": {"name": "acme"}}},
            },
            "scope": {"project": {"id": PROJECT}},
        }
    }


def test_parse_expires_at() -> None:
    expected = datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC).timestamp()
    assert parse_expires_at("2024-01-02T03:04:05.123000Z") == expected
    assert parse_expires_at("2024-01-02T11:04:05.123+08:00") == expected
    assert parse_expires_at("2024-01-02T03:04:05.123") == expected
    for bad in (None, 5, "tomorrow"):
        with pytest.raises(ValueError):
            parse_expires_at(bad)


def test_iam_error_message_shapes() -> None:
    iam = (
        b'{"error": {"code": 401, "message": "The username or password is wrong.", "title": "Unauthorized"}}'
    )
    assert iam_error_message(iam) == "The username or password is wrong. (401)"
    apig = b'{"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information"}'
    assert iam_error_message(apig) == "Incorrect IAM authentication information (APIGW.0301)"
    assert iam_error_message(b"<html>\n bad   gateway </html>") == "<html> bad gateway </html>"
    assert iam_error_message(b"") == "no details"
    assert len(iam_error_message(b"x" * 5000)) == 200


@pytest.mark.parametrize(
    ("issued", "expires", "now", "margin", "renew"),
    [
        (0, 86400, 0, 300, False),
        (0, 86400, 86400 - 301, 300, False),
        (0, 86400, 86400 - 300, 300, True),
        (0, 86400, 90000, 300, True),
        (0, 60, 29, 300, False),  # short-lived tokens renew at half-life, not on every request
        (0, 60, 30, 300, True),
    ],
)
def test_token_needs_renewal(issued: float, expires: float, now: float, margin: float, renew: bool) -> None:
    assert token_needs_renewal(_Token(Secret("t"), issued, expires), now, margin) is renew


async def test_iam_needs_a_project_id() -> None:
    creds = IamPassword("u", "d", "p", iam_endpoint="http://127.0.0.1:9")
    with pytest.raises(AuthError, match="project id"):
        await creds.headers_for(Scope("", None, "http://127.0.0.1:9"), "GET", URL, {}, b"")
    await creds.aclose()
