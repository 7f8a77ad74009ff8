"""Credential providers: the headers that make a GaussDB API call authenticated.

The client asks a provider for headers on every attempt, *after* deciding to (re)send, so AK/SK
signatures always carry a fresh ``X-Sdk-Date`` and IAM tokens are renewed before they lapse. On a 401 the
client calls ``on_unauthorized`` once and resends once only if the provider says a renewal can help.

Providers (chosen by :func:`credentials_from_env`, precedence in ``docs/auth.md``):

- ``AkSk``: signs each request (``signer.sign_request``), optionally with STS temporary credentials;
- ``IamPassword``: exchanges user/domain/password for a project-scoped IAM token, cached per
  (IAM endpoint, project), renewed ``renew_margin_s`` before expiry, one exchange at a time per scope;
- ``StaticToken``: a token obtained elsewhere (``X-Auth-Token``), never renewed;
- ``NoAuth``: nothing (the simulator without auth).

Secrets live in :class:`~orchestrator.cloud.redact.Secret`; no repr, exception text or event carries them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp

from orchestrator.cloud.endpoints import iam_endpoint_for_region
from orchestrator.cloud.redact import MASK, Secret, scrub
from orchestrator.cloud.signer import sign_request

__all__ = [
    "AkSk",
    "AuthError",
    "Clock",
    "Credentials",
    "EventHook",
    "IamPassword",
    "IamUnavailable",
    "NoAuth",
    "Scope",
    "StaticToken",
    "credentials_from_env",
]

Clock = Callable[[], float]
"""Wall-clock seconds since the epoch (``time.time``): token expiry and X-Sdk-Date are wall-clock."""

EventHook = Callable[[str, Mapping[str, object]], None]
"""Receives ``(event, fields)``, e.g. ``("auth.token.issued", {"project_id": ..., "expires_at": ...})``."""

ENV_AK = "HUAWEICLOUD_SDK_AK"
ENV_SK = "HUAWEICLOUD_SDK_SK"
ENV_SECURITY_TOKEN = "HUAWEICLOUD_SDK_SECURITY_TOKEN"
ENV_IAM_USER = "ORCHESTRATOR_IAM_USER"
ENV_IAM_DOMAIN = "ORCHESTRATOR_IAM_DOMAIN"
ENV_IAM_PASSWORD = "ORCHESTRATOR_IAM_PASSWORD"
ENV_IAM_PASSWORD_FILE = "ORCHESTRATOR_IAM_PASSWORD_FILE"
ENV_AUTH_TOKEN = "ORCHESTRATOR_AUTH_TOKEN"

_TOKEN_HEADER = "X-Auth-Token"
_SUBJECT_TOKEN_HEADER = "X-Subject-Token"
_MESSAGE_LIMIT = 200
_RENEW_RETRY_S = 30.0  # after a failed renewal, keep using the old token this long before trying again
_MIN_USABLE_S = 60.0  # an old token with less than this left is not worth sending


@dataclass(frozen=True)
class Scope:
    """Where a request goes: the project its token must be scoped to, and the service base URL."""

    project_id: str
    region: str | None
    endpoint: str


class AuthError(Exception):
    """Credentials are missing, inconsistent or refused. The message is safe to print: it never holds
    a password, SK or token."""


class IamUnavailable(AuthError):
    """IAM could not be reached or answered 429/5xx: the credentials may be fine and a later try may work."""


@runtime_checkable
class Credentials(Protocol):
    """A credential provider: what the client asks for each attempt's authentication headers and, on a
    401, whether a resend may help. ``name`` names the kind in logs (``aksk``, ``iam-password``,
    ``token``, ``none``), never the secret."""

    name: str

    async def headers_for(
        self, scope: Scope, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """Headers to add to this attempt (send ``{**headers, **result}``; ``headers`` must not already
        hold any of the returned names). ``url`` is the full URL with its query, ``body`` the exact bytes
        sent. Raises ``AuthError`` when no usable credential can be had (refused, misconfigured) and
        ``IamUnavailable`` when a token cannot be fetched now (the client then sends nothing)."""
        ...

    async def on_unauthorized(self, scope: Scope, sent_headers: Mapping[str, str]) -> bool:
        """A 401 came back for a request sent with ``sent_headers``: True if resending once may succeed."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (an HTTP session it opened itself); safe to call twice."""
        ...


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


class NoAuth:
    """No credentials: for the simulator run without auth, or a gateway that authenticates elsewhere."""

    name: str = "none"

    async def headers_for(
        self, scope: Scope, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """No headers."""
        return {}

    async def on_unauthorized(self, scope: Scope, sent_headers: Mapping[str, str]) -> bool:
        """False: there is nothing to renew."""
        return False

    async def aclose(self) -> None:
        """Nothing to release."""
        return None

    def __repr__(self) -> str:
        return "NoAuth()"


class StaticToken:
    """A token obtained elsewhere (e.g. ``hcloud``); it cannot be renewed, so a 401 is final."""

    name: str = "token"

    def __init__(self, token: str) -> None:
        if not token.strip():
            raise AuthError("the auth token is empty")
        self._token = Secret(token.strip())

    async def headers_for(
        self, scope: Scope, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """The token as ``X-Auth-Token`` (docs/api-contract.md, Common: headers)."""
        return {_TOKEN_HEADER: self._token.reveal()}

    async def on_unauthorized(self, scope: Scope, sent_headers: Mapping[str, str]) -> bool:
        """False: the token cannot be renewed, the 401 is final."""
        return False

    async def aclose(self) -> None:
        """Nothing to release."""
        return None

    def __repr__(self) -> str:
        return f"StaticToken(token={MASK!r})"


class AkSk:
    """AK/SK request signing (``SDK-HMAC-SHA256``), with an STS security token for temporary keys.

    A signature cannot be renewed: a 401 means wrong keys or a skewed clock, and resending would only
    count towards the gateway's five-bad-signatures key lock.
    """

    name: str = "aksk"

    def __init__(
        self, ak: str, sk: str, security_token: str | None = None, *, clock: Clock = time.time
    ) -> None:
        if not ak or not sk:
            raise AuthError("AK/SK credentials need both the AK and the SK")
        self.ak = ak  # an identifier, not a secret: it is in every Authorization header
        self._sk = Secret(sk)
        self._security_token = Secret(security_token) if security_token else None
        self._clock = clock

    async def headers_for(
        self, scope: Scope, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """The signature headers for this attempt, dated now on ``clock``: ``X-Sdk-Date``, ``Host``,
        ``X-Project-Id``, ``X-Security-Token`` for temporary keys, and ``Authorization`` (the steps of
        docs/api-contract.md, Authentication; ``signer.sign_request``). Only headers not already sent with
        the same value are returned."""
        signed = sign_request(
            self.ak,
            self._sk.reveal(),
            method,
            url,
            dict(headers),
            body,
            now=datetime.fromtimestamp(self._clock(), UTC),
            project_id=scope.project_id or None,
            security_token=self._security_token.reveal() if self._security_token else None,
        )
        return {name: value for name, value in signed.items() if headers.get(name) != value}

    async def on_unauthorized(self, scope: Scope, sent_headers: Mapping[str, str]) -> bool:
        """False: a signature cannot be renewed (see the class docstring)."""
        return False

    async def aclose(self) -> None:
        """Nothing to release."""
        return None

    def __repr__(self) -> str:
        token = MASK if self._security_token else None
        return f"AkSk(ak={self.ak!r}, sk={MASK!r}, security_token={token!r})"


@dataclass(frozen=True)
class _Token:
    value: Secret = field(repr=False)
    issued_at: float
    expires_at: float


def iam_token_request_body(user: str, domain: str, password: str, project_id: str) -> dict[str, Any]:
    """The password-method, project-scoped body of ``POST /v3/auth/tokens`` (see the API contract)."""
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": user, "password": password, "domain": {"name": domain}}},
            },
            "scope": {"project": {"id": project_id}},
        }
    }


def parse_expires_at(value: object) -> float:
    """Epoch seconds of IAM's ``token.expires_at`` (ISO 8601, ``Z`` or offset; naive means UTC)."""
    if not isinstance(value, str):
        raise ValueError("expires_at is not a string")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iam_error_message(body: bytes) -> str:
    """The human part of an IAM/APIG error body, whichever of their two shapes it has; short."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message: object = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        message = message or parsed.get("error_msg")
        code = (error.get("code") if isinstance(error, dict) else None) or parsed.get("error_code")
        if message and code:
            message = f"{message} ({code})"
    result = " ".join(str(message or text or "no details").split())
    return result[:_MESSAGE_LIMIT]


def token_needs_renewal(token: _Token, now: float, margin_s: float) -> bool:
    """Renew ``margin_s`` before expiry, or at half-life for tokens shorter-lived than twice the margin
    (a test IAM issuing 60 s tokens must not cause one exchange per request)."""
    lifetime = token.expires_at - token.issued_at
    return now >= token.expires_at - min(margin_s, lifetime / 2)


class IamPassword:
    """IAM user/password credentials, exchanged for project-scoped tokens sent as ``X-Auth-Token``.

    Tokens are cached per (IAM endpoint, project id), since a token is only valid for the project it is
    scoped to. However many workers ask at once, one exchange runs per scope; the others wait for it.
    """

    name: str = "iam-password"

    def __init__(
        self,
        user: str,
        domain: str,
        password: str,
        *,
        session: aiohttp.ClientSession | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        iam_endpoint: Callable[[Scope], str] | str | None = None,
        clock: Clock = time.time,
        renew_margin_s: float = 300.0,
        request_timeout_s: float = 30.0,
        on_event: EventHook | None = None,
    ) -> None:
        if not user or not domain or not password:
            raise AuthError("IAM password credentials need a user, a domain and a password")
        self.user = user
        self.domain = domain
        self._password = Secret(password)
        self._session = session
        self._session_factory = session_factory or _default_session
        self._owned_session: aiohttp.ClientSession | None = None
        self._iam_endpoint = iam_endpoint
        self._clock = clock
        self._renew_margin_s = renew_margin_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._on_event = on_event
        self._cache: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._retry_after: dict[tuple[str, str], float] = {}

    def __repr__(self) -> str:
        return (
            f"IamPassword(user={self.user!r}, domain={self.domain!r}, password={MASK!r}, "
            f"iam_endpoint={self._iam_endpoint!r})"
        )

    def iam_base_url(self, scope: Scope) -> str:
        """The IAM base URL for ``scope`` (no trailing ``/``): the explicit endpoint (a string, or a
        function of the scope) when given, else the region's IAM endpoint. Raises ``AuthError`` when
        neither an endpoint nor a region is known."""
        if callable(self._iam_endpoint):
            base = self._iam_endpoint(scope)
        elif self._iam_endpoint is not None:
            base = self._iam_endpoint
        elif scope.region:
            base = iam_endpoint_for_region(scope.region)
        else:
            raise AuthError("no IAM endpoint: give the region or an explicit IAM endpoint")
        return base.rstrip("/")

    async def headers_for(
        self, scope: Scope, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """The scope's cached token as ``X-Auth-Token``, exchanged first when there is none or it is due
        for renewal. A failed renewal (``IamUnavailable``) keeps a token with more than a minute left and
        tries again 30 s later; without one it raises. Raises ``AuthError`` when IAM refuses the user."""
        return {_TOKEN_HEADER: (await self._current_token(scope)).value.reveal()}

    async def on_unauthorized(self, scope: Scope, sent_headers: Mapping[str, str]) -> bool:
        """A 401 for a request sent with ``sent_headers``: unless another worker already replaced the
        refused token, exchange a new one now. True (resend once) when a token was sent; False for a
        request without one. Raises as ``headers_for`` does when the exchange fails."""
        sent = _header(sent_headers, _TOKEN_HEADER)
        if sent is None:
            return False
        key = self._key(scope)
        async with self._lock(key):
            cached = self._cache.get(key)
            if (
                cached is not None
                and cached.value.reveal() != sent
                and not token_needs_renewal(cached, self._clock(), self._renew_margin_s)
            ):
                return True  # another worker already replaced the refused token
            self._cache.pop(key, None)
            self._cache[key] = await self._exchange(scope, key, reason="unauthorized")
        return True

    async def aclose(self) -> None:
        """Close the IAM session this provider opened itself (not one it was given); safe to call twice."""
        session, self._owned_session = self._owned_session, None
        if session is not None:
            await session.close()

    def _key(self, scope: Scope) -> tuple[str, str]:
        if not scope.project_id:
            raise AuthError("an IAM token needs a project id to be scoped to")
        return self.iam_base_url(scope), scope.project_id

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _current_token(self, scope: Scope) -> _Token:
        key = self._key(scope)
        cached = self._cache.get(key)
        if cached is not None and not token_needs_renewal(cached, self._clock(), self._renew_margin_s):
            return cached
        async with self._lock(key):
            cached = self._cache.get(key)
            now = self._clock()
            if cached is not None and not token_needs_renewal(cached, now, self._renew_margin_s):
                return cached
            usable = cached is not None and now < cached.expires_at - _MIN_USABLE_S
            if cached is not None and usable and now < self._retry_after.get(key, 0.0):
                return cached
            try:
                token = await self._exchange(scope, key, reason="expiring" if cached else "initial")
            except IamUnavailable as exc:
                if cached is None or not usable:
                    raise
                self._retry_after[key] = now + _RENEW_RETRY_S
                self._emit("auth.token.renew_deferred", project_id=key[1], error=str(exc))
                return cached
            self._cache[key] = token
            self._retry_after.pop(key, None)
            return token

    async def _exchange(self, scope: Scope, key: tuple[str, str], *, reason: str) -> _Token:
        iam, project_id = key
        url = f"{iam}/v3/auth/tokens?nocatalog=true"
        who = f"user {self.user!r} in domain {self.domain!r}"
        session = self._get_session()
        try:
            async with session.post(
                url,
                # Built inline so no local variable of this frame holds the password.
                data=json.dumps(
                    iam_token_request_body(self.user, self.domain, self._password.reveal(), project_id)
                ).encode("utf-8"),
                headers={"Content-Type": "application/json;charset=UTF-8"},
                timeout=self._timeout,
                proxy=_proxy_for(url),
            ) as response:
                status = response.status
                raw = await response.read()
                subject = response.headers.get(_SUBJECT_TOKEN_HEADER)
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = scrub(str(exc) or type(exc).__name__, [self._password])
            raise IamUnavailable(f"cannot reach IAM at {iam} for {who}: {detail}"[:400]) from None
        if status in (200, 201):
            return self._accept(raw, subject, iam, project_id, reason)
        message = scrub(iam_error_message(raw), [self._password])
        if status == 401:
            raise AuthError(f"IAM refused {who}: {message}")
        if status == 429 or status >= 500:
            raise IamUnavailable(f"IAM at {iam} answered HTTP {status} for {who}: {message}")
        raise AuthError(f"IAM answered HTTP {status} for {who} (project {project_id}): {message}")

    def _accept(self, raw: bytes, subject: str | None, iam: str, project_id: str, reason: str) -> _Token:
        # A 201 that lost its token on the way (a proxy page, a truncated body) says the credentials were
        # accepted: that is a transient fault to retry, not a refusal that should stop the run.
        if not subject:
            raise IamUnavailable(f"IAM at {iam} answered without an {_SUBJECT_TOKEN_HEADER} header")
        try:
            expires_at = parse_expires_at(json.loads(raw)["token"]["expires_at"])
        except (ValueError, KeyError, TypeError):
            raise IamUnavailable(f"IAM at {iam} answered without a readable token.expires_at") from None
        issued_at = self._clock()
        if expires_at <= issued_at:
            raise AuthError(
                f"IAM at {iam} issued a token that has already expired by the local clock: check the clock"
            )
        self._emit(
            "auth.token.issued",
            project_id=project_id,
            iam=iam,
            reason=reason,
            expires_at=datetime.fromtimestamp(expires_at, UTC).isoformat(),
        )
        return _Token(Secret(subject), issued_at, expires_at)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._owned_session is None or self._owned_session.closed:
            self._owned_session = self._session_factory()
        return self._owned_session

    def _emit(self, event: str, **fields: object) -> None:
        if self._on_event is not None:
            self._on_event(event, fields)


def _proxy_for(url: str) -> str | None:
    # the run's session resolves proxies once per host (cloud/client.py): the IAM call does the same
    from orchestrator.cloud.client import proxy_for

    return proxy_for(url)


def _default_session() -> aiohttp.ClientSession:
    # TLS verification stays on (aiohttp's default); trust_env honours HTTPS_PROXY / NO_PROXY.
    return aiohttp.ClientSession(trust_env=True)


def _present(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def _read_password_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthError(f"cannot read {ENV_IAM_PASSWORD_FILE} ({path}): {exc.strerror or 'error'}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise AuthError(f"{ENV_IAM_PASSWORD_FILE} ({path}) is empty")
    return password


def _iam_from_env(
    env: Mapping[str, str], iam_endpoint: str | None, session: aiohttp.ClientSession | None
) -> IamPassword | None:
    names = (ENV_IAM_USER, ENV_IAM_DOMAIN, ENV_IAM_PASSWORD, ENV_IAM_PASSWORD_FILE)
    values = {name: _present(env, name) for name in names}
    if not any(values.values()):
        return None
    missing = [name for name in (ENV_IAM_USER, ENV_IAM_DOMAIN) if not values[name]]
    if not values[ENV_IAM_PASSWORD] and not values[ENV_IAM_PASSWORD_FILE]:
        missing.append(f"{ENV_IAM_PASSWORD} or {ENV_IAM_PASSWORD_FILE}")
    if missing:
        raise AuthError(f"IAM password credentials are incomplete: set {', '.join(missing)}")
    if values[ENV_IAM_PASSWORD] and values[ENV_IAM_PASSWORD_FILE]:
        raise AuthError(f"set only one of {ENV_IAM_PASSWORD} and {ENV_IAM_PASSWORD_FILE}")
    password = values[ENV_IAM_PASSWORD] or _read_password_file(values[ENV_IAM_PASSWORD_FILE] or "")
    return IamPassword(
        values[ENV_IAM_USER] or "",
        values[ENV_IAM_DOMAIN] or "",
        password,
        session=session,
        iam_endpoint=iam_endpoint,
    )


def credentials_from_env(
    env: Mapping[str, str] = os.environ,
    *,
    iam_endpoint: str | None = None,
    session: aiohttp.ClientSession | None = None,
) -> Credentials:
    """Pick the provider from environment variables: AK/SK, then IAM password, then a static token, then
    none. Half-configured sources are errors (naming the variables, never their values) rather than
    being silently skipped in favour of the next source."""
    ak, sk = _present(env, ENV_AK), _present(env, ENV_SK)
    security_token = _present(env, ENV_SECURITY_TOKEN)
    if ak and sk:
        return AkSk(ak, sk, security_token)
    if ak or sk:
        missing = ENV_SK if ak else ENV_AK
        present = ENV_AK if ak else ENV_SK
        raise AuthError(f"{present} is set but {missing} is not: set both or neither")
    if security_token:
        raise AuthError(f"{ENV_SECURITY_TOKEN} is set without {ENV_AK} and {ENV_SK}")
    iam = _iam_from_env(env, iam_endpoint, session)
    if iam is not None:
        return iam
    token = _present(env, ENV_AUTH_TOKEN)
    if token:
        return StaticToken(token)
    return NoAuth()
