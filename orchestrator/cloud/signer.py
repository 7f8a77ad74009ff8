"""AK/SK request signing (``SDK-HMAC-SHA256``), byte-for-byte as ``huaweicloudsdkcore`` does it.

The gateway recomputes the signature from what it receives, so every quirk of the official SDK signer
matters and is reproduced here on purpose (``tests/unit/test_signer.py`` checks thousands of generated
requests against the real SDK):

- the canonical URI percent-decodes the path first, splits it on ``/`` (so an encoded ``%2F`` splits too),
  re-encodes each segment with ``safe='~'`` and always ends with ``/``;
- the canonical query sorts the *decoded* ``(key, value)`` pairs, then encodes each side with ``safe='~'``
  (spaces become ``%20``, never ``+``), keeping repeated keys and empty values (``k=``);
- every header whose name has no ``_`` is signed, lower-cased, with its value stripped;
- an empty body hashes to the SHA-256 of nothing; a non-empty body hashes to its SHA-256, unless an
  ``X-Sdk-Content-Sha256`` header supplies the hash (the SDK sets ``UNSIGNED-PAYLOAD`` there for any
  content type other than JSON/BSON).

Stdlib only: the SDK is a test-time reference, never a runtime dependency. Both sides use this module:
the cloud client through :func:`sign_request` and the simulator through :func:`compute_signature` and
:func:`parse_authorization`. No function here logs, and no error message carries the SK.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = [
    "ALGORITHM",
    "SDK_DATE_FORMAT",
    "canonical_query",
    "canonical_uri",
    "compute_signature",
    "parse_authorization",
    "sign_request",
    "signed_header_names",
]

SDK_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
ALGORITHM = "SDK-HMAC-SHA256"

_HEADER_DATE = "X-Sdk-Date"
_HEADER_HOST = "Host"
_HEADER_PROJECT = "X-Project-Id"
_HEADER_SECURITY_TOKEN = "X-Security-Token"
_HEADER_AUTHORIZATION = "Authorization"
_HEADER_CONTENT_HASH = "X-Sdk-Content-Sha256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_EMPTY_HASH = hashlib.sha256(b"").hexdigest()
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _encode(text: str) -> str:
    return quote(text, safe="~")


def canonical_uri(path: str) -> str:
    """The path as the gateway signs it; ``path`` is the raw (percent-encoded) path as sent on the wire."""
    url_path = "/".join(_encode(segment) for segment in unquote(path).split("/"))
    return url_path if url_path.endswith("/") else url_path + "/"


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """The query as the gateway signs it, from decoded pairs.

    Also a valid wire encoding of that query, which is how the SDK sends it: a client that sends exactly
    this string cannot disagree with the signature about what the query was.
    """
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in sorted(query))


def _header_lookup(headers: Mapping[str, str], name: str) -> str | None:
    """First header whose name matches case-insensitively, as the SDK's ``_get_header_ignore_case``."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def signed_header_names(headers: Mapping[str, str]) -> list[str]:
    """Every header name without ``_``, lower-cased and sorted: the SDK signs all of them."""
    return sorted(name.lower() for name in headers if "_" not in name)


def _payload_hash(headers: Mapping[str, str], body: bytes) -> str:
    if not body:
        return _EMPTY_HASH
    declared = _header_lookup(headers, _HEADER_CONTENT_HASH)
    if declared:
        return declared
    return hashlib.sha256(body).hexdigest()


def _signing_time(headers: Mapping[str, str]) -> str:
    raw = _header_lookup(headers, _HEADER_DATE)
    if raw is None:
        raise ValueError(f"missing {_HEADER_DATE} header")
    try:
        parsed = datetime.strptime(raw, SDK_DATE_FORMAT)
    except ValueError:
        raise ValueError(f"{_HEADER_DATE} is not in {SDK_DATE_FORMAT} format") from None
    # Re-formatted like the SDK does, so a lenient-but-odd date (e.g. one-digit month) signs identically.
    return parsed.strftime(SDK_DATE_FORMAT)


def compute_signature(
    sk: str,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: list[str],
    body: bytes,
) -> str:
    """Hex ``SDK-HMAC-SHA256`` signature of a request.

    ``path`` is the raw path (no query), ``query`` the decoded pairs, ``headers`` the request headers in
    any case (must hold ``X-Sdk-Date``), ``signed_headers`` the lower-case names to sign, in the order
    they appear in the Authorization header. Raises ``ValueError`` (without secrets) when a signed header
    or the date is missing.
    """
    canonical_values: dict[str, str] = {}
    for name, value in headers.items():
        canonical_values[name.lower()] = str(value).strip()
    lines = []
    for name in signed_headers:
        if name not in canonical_values:
            raise ValueError(f"signed header {name!r} is not in the request")
        lines.append(f"{name}:{canonical_values[name]}")
    canonical_request = "\n".join(
        [
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            "\n".join(lines) + "\n",
            ";".join(signed_headers),
            _payload_hash(headers, body),
        ]
    )
    string_to_sign = "\n".join(
        [ALGORITHM, _signing_time(headers), hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()]
    )
    return hmac.new(sk.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _host_header(scheme: str, netloc: str) -> str:
    host = netloc.rpartition("@")[2]
    default_port = _DEFAULT_PORTS.get(scheme.lower())
    if default_port is not None and host.endswith(f":{default_port}"):
        host = host[: -len(f":{default_port}")]
    return host


def _format_date(now: datetime | None) -> str:
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime(SDK_DATE_FORMAT)


def _without(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    dropped = {name.lower() for name in names}
    return {key: value for key, value in headers.items() if key.lower() not in dropped}


def sign_request(
    ak: str,
    sk: str,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    *,
    now: datetime | None = None,
    project_id: str | None = None,
    security_token: str | None = None,
) -> dict[str, str]:
    """The full header set to send for ``url``: ``headers`` plus date, host, project, token, signature.

    A naive ``now`` is taken as UTC. An existing ``Host`` is kept (as the SDK does); any existing date,
    project, security-token or Authorization header is replaced, whatever its case, so a resend after a
    retry decision always carries a fresh date. ``headers`` is not modified.
    """
    parts = urlsplit(url)
    result = _without(headers, [_HEADER_DATE, _HEADER_PROJECT, _HEADER_SECURITY_TOKEN, _HEADER_AUTHORIZATION])
    content_type = _header_lookup(result, "Content-Type")
    if content_type and not content_type.startswith(("application/json", "application/bson")):
        result = _without(result, [_HEADER_CONTENT_HASH])
        result[_HEADER_CONTENT_HASH] = _UNSIGNED_PAYLOAD
    if project_id is not None:
        result[_HEADER_PROJECT] = project_id
    if security_token is not None:
        result[_HEADER_SECURITY_TOKEN] = security_token
    result[_HEADER_DATE] = _format_date(now)
    if _header_lookup(result, _HEADER_HOST) is None:
        result[_HEADER_HOST] = _host_header(parts.scheme, parts.netloc)
    signed = signed_header_names(result)
    query = parse_qsl(parts.query, keep_blank_values=True)
    signature = compute_signature(sk, method, parts.path, query, result, signed, body)
    result[_HEADER_AUTHORIZATION] = (
        f"{ALGORITHM} Access={ak}, SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return result


def parse_authorization(value: str) -> tuple[str, list[str], str]:
    """``(ak, signed_headers, signature)`` from an ``SDK-HMAC-SHA256`` Authorization header value.

    Raises ``ValueError`` on anything else; the message never repeats the value.
    """
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise ValueError(f"Authorization is not {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, field_value = part.strip().partition("=")
        if not sep or key in fields:
            raise ValueError("malformed Authorization header")
        fields[key] = field_value.strip()
    if set(fields) != {"Access", "SignedHeaders", "Signature"}:
        raise ValueError("Authorization needs exactly Access, SignedHeaders and Signature")
    ak, signed, signature = fields["Access"], fields["SignedHeaders"], fields["Signature"]
    if not ak or not signed or not signature:
        raise ValueError("Authorization has an empty Access, SignedHeaders or Signature")
    return ak, signed.split(";"), signature
