"""Keeping credentials out of logs, reprs and error text.

``Secret`` holds a credential so that the usual ways a value leaks (``repr`` of the owner, ``vars()``,
a traceback printed with locals, an f-string in a log line) show ``***`` instead; only an explicit
``reveal()`` at the point of use returns it. ``redact_headers`` is for anything that logs or records
request/response headers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["MASK", "SENSITIVE_HEADERS", "Secret", "redact_headers", "scrub"]

MASK: Final = "***"

SENSITIVE_HEADERS: Final = frozenset(
    {
        "x-auth-token",
        "authorization",
        "x-security-token",
        "x-subject-token",
        "cookie",
        "set-cookie",
        "proxy-authorization",
    }
)


class Secret:
    """A credential that refuses to print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for the header or body it is sent in, never for text."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(other._value.encode(), self._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickling (multiprocessing, caches) must not be a quiet way out either.
        raise TypeError("Secret values are not picklable")


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with every credential-bearing value replaced by ``***`` (names any case)."""
    return {name: MASK if name.lower() in SENSITIVE_HEADERS else value for name, value in headers.items()}


def scrub(text: str, secrets: Iterable[str | Secret | None]) -> str:
    """``text`` with every occurrence of the given secrets replaced by ``***``.

    For text that came from outside (an IAM error message may echo what it was sent) before it goes into
    an exception or a log line.
    """
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value:
            text = text.replace(value, MASK)
    return text
