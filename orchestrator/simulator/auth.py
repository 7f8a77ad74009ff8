"""The simulated API gateway's authentication: IAM tokens and AK/SK signatures, as the real one judges them.

The point is to rehearse what goes wrong with credentials (an expired token mid-run, a skewed clock, a
wrong SK locking the key) before it goes wrong in the maintenance window. The clock is injectable, and
nothing here ever puts a token, password or SK into an answer, a log record or an exception.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.cloud.signer import SDK_DATE_FORMAT, compute_signature, parse_authorization
from orchestrator.simulator.fleet import Reply, error_reply
from orchestrator.simulator.scenario import AuthSpec, KeySpec

_PREFIX = "Incorrect IAM authentication information: "


@dataclass(frozen=True, slots=True)
class Denial:
    """Why the gateway refused a request: ``reason`` for the call log, ``message`` for the answer."""

    reason: str  # stable key for the call log: no_credentials, bad_token, expired_token, unknown_ak, ...
    message: str

    def reply(self) -> Reply:
        """The gateway's answer: 401 ``APIGW.0301`` "Incorrect IAM authentication information: ..."
        (docs/api-contract.md, Authentication)."""
        return error_reply(401, "APIGW.0301", _PREFIX + self.message)


class GatewayAuth:
    """Judges each request's credentials; issues IAM tokens. Token lifetime and key locks are real time."""

    def __init__(
        self,
        spec: AuthSpec,
        project_id: str,
        clock: Callable[[], float] = time.time,
        new_token: Callable[[], str] = lambda: "MII" + secrets.token_urlsafe(48),
    ) -> None:
        self.spec = spec
        self.project_id = project_id
        self.clock = clock
        self._new_token = new_token
        self._issued: dict[str, float] = {}  # token -> expires_at
        self._bad_in_a_row: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self.token_issues = 0
        self.auth_failures = 0

    def __repr__(self) -> str:
        return f"GatewayAuth(mode={self.spec.mode!r}, issued={len(self._issued)})"

    # -- judging requests ---------------------------------------------------------------------------

    def check(
        self,
        method: str,
        raw_path: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Denial | None:
        """Judge one request's credentials as the mode allows (``none``, ``token``, ``aksk``, ``any``):
        None when it may pass, else the ``Denial``. A token must be a static one or issued and unexpired;
        a signature must parse, name a known and unlocked AK, carry an ``X-Sdk-Date`` within
        ``max_skew_s`` of this clock, match (``raw_path`` as sent, ``query`` decoded, ``body`` the exact
        bytes) and, for a temporary key, sign its security token. ``lock_after`` bad signatures in a row
        lock the AK for ``lock_s`` seconds (docs/api-contract.md, Authentication)."""
        mode = self.spec.mode
        if mode == "none":
            return None
        lower = {name.lower(): value for name, value in headers.items()}
        authorization = lower.get("authorization")
        token = lower.get("x-auth-token")
        if mode in ("aksk", "any") and authorization:
            denial = self._check_signature(method, raw_path, query, headers, lower, body, authorization)
        elif mode in ("token", "any") and token:
            denial = self._check_token(token)
        else:
            wanted = {"token": "X-Auth-Token", "aksk": "an AK/SK signature"}.get(mode, "credentials")
            denial = Denial("no_credentials", f"the request carries no {wanted}")
        if denial is not None:
            self.auth_failures += 1
        return denial

    def _check_token(self, token: str) -> Denial | None:
        if any(_same(t.get_secret_value(), token) for t in self.spec.tokens):
            return None
        expires_at = self._issued.get(token)
        if expires_at is None:
            return Denial("bad_token", "verify token failed")
        if self.clock() >= expires_at:
            return Denial("expired_token", "the token has expired")
        return None

    def _check_signature(
        self,
        method: str,
        raw_path: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
        lower: Mapping[str, str],
        body: bytes,
        authorization: str,
    ) -> Denial | None:
        try:
            ak, signed_headers, signature = parse_authorization(authorization)
        except ValueError:
            return Denial(
                "bad_authorization", "the Authorization header is not a valid SDK-HMAC-SHA256 value"
            )
        key = next((k for k in self.spec.keys if k.ak == ak), None)
        if key is None:
            return Denial("unknown_ak", "the access key is unknown")
        now = self.clock()
        locked_until = self._locked_until.get(ak, 0.0)
        if now < locked_until:
            return Denial(
                "locked_ak",
                f"the access key is locked for {locked_until - now:.0f} s after repeated bad signatures",
            )
        sdk_date = lower.get("x-sdk-date")
        try:
            signed_at = datetime.strptime(sdk_date or "", SDK_DATE_FORMAT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            return Denial("bad_date", "X-Sdk-Date is missing or not in yyyymmddThhmmssZ format")
        if abs(now - signed_at) > self.spec.max_skew_s:
            return Denial(
                "clock_skew",
                f"X-Sdk-Date is more than {self.spec.max_skew_s / 60:.0f} minutes away from the server time",
            )
        try:
            expected = compute_signature(
                key.sk.get_secret_value(), method, raw_path, query, headers, signed_headers, body
            )
        except ValueError:
            expected = ""
        if expected and _same(expected, signature):
            self._bad_in_a_row.pop(ak, None)
            return self._check_security_token(key, lower, signed_headers)
        count = self._bad_in_a_row.get(ak, 0) + 1
        self._bad_in_a_row[ak] = count
        if count >= self.spec.lock_after:
            self._locked_until[ak] = now + self.spec.lock_s
            self._bad_in_a_row.pop(ak, None)
        return Denial("bad_signature", "verify aksk signature fail")

    @staticmethod
    def _check_security_token(
        key: KeySpec, lower: Mapping[str, str], signed_headers: list[str]
    ) -> Denial | None:
        """Temporary keys are only valid with their security token, and the token must be signed."""
        if key.security_token is None:
            return None
        given = lower.get("x-security-token")
        if given is None or "x-security-token" not in [h.lower() for h in signed_headers]:
            return Denial("no_security_token", "temporary access keys need a signed X-Security-Token")
        if not _same(key.security_token.get_secret_value(), given):
            return Denial("bad_security_token", "the security token is invalid or expired")
        return None

    # -- IAM ----------------------------------------------------------------------------------------

    def issue_token(self, body: Any) -> Reply:
        """POST /v3/auth/tokens with the password flow; 201 with X-Subject-Token, or an IAM error."""
        try:
            identity = body["auth"]["identity"]
            user = identity["password"]["user"]
            name, domain, password = user["name"], user["domain"]["name"], user["password"]
            scope = body["auth"].get("scope", {}).get("project", {})
            if "password" not in identity["methods"] or not all(
                isinstance(v, str) for v in (name, domain, password)
            ):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            return _iam_error(
                400, "IAM.0011", "Bad Request", "The request body is not a password token request."
            )
        if self.spec.users and not any(
            u.name == name
            and u.domain == domain
            and hmac.compare_digest(u.password.get_secret_value(), password)
            for u in self.spec.users
        ):
            self.auth_failures += 1
            return _iam_error(401, "IAM.0004", "Unauthorized", "The username or password is wrong.")
        now = self.clock()
        expires_at = now + self.spec.token_lifetime_s
        token = self._new_token()
        self._issued[token] = expires_at
        self.token_issues += 1
        project_id = scope.get("id") if isinstance(scope, dict) else None
        project_name = scope.get("name") if isinstance(scope, dict) else None
        return Reply(
            201,
            {
                "token": {
                    "expires_at": _iso(expires_at),
                    "issued_at": _iso(now),
                    "methods": ["password"],
                    "project": {
                        "id": project_id or self.project_id,
                        "name": project_name or "cn-north-4",
                        "domain": {"name": domain, "id": "0" * 32},
                    },
                    "user": {"name": name, "id": "1" * 32, "domain": {"name": domain, "id": "0" * 32}},
                    "catalog": [],
                }
            },
            headers={"X-Subject-Token": token},
        )


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def _iam_error(status: int, code: str, title: str, message: str) -> Reply:
    return Reply(status, {"error": {"code": code, "title": title, "message": message}})


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
