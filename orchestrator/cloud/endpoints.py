"""API base URLs: the region table, and the one validator every endpoint passes before a run uses it.

The GaussDB(for MySQL) hosts differ by region in three patterns that no template predicts, so the region
table is copied from the API reference (see ``docs/api-contract`` in the shared docs); an explicit
``endpoint`` always wins over it.

``validate_endpoint`` is the single gate for every way an endpoint enters a run: an inventory's
``endpoint`` field, ``--endpoint`` on run/resume/plan/validate/discover, and the options stored with a
run (a resume or a worker reads them back). A base URL may only name a scheme, a host and a port:
anything else (a path, a query, a user and password) could send our signed requests, or a token,
somewhere the operator did not mean, and plain ``http`` would show them to the network.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "REGION_HOSTS",
    "UnknownRegion",
    "endpoint_for_region",
    "iam_endpoint_for_region",
    "is_loopback_host",
    "validate_endpoint",
]

_PATTERNS: dict[str, tuple[str, ...]] = {
    "gaussdb.{region}.myhuaweicloud.com": (
        "cn-north-4", "cn-north-9", "cn-north-2", "cn-east-3", "cn-south-1", "cn-south-4",
        "cn-southwest-2", "ap-southeast-3", "ap-southeast-4", "sa-brazil-1", "ru-northwest-2",
    ),
    "gaussdbformysql.{region}.myhuaweicloud.com": (
        "tr-west-1", "ap-southeast-1", "ap-southeast-2", "cn-north-11", "me-east-1",
    ),
    "gaussdb-mysql.{region}.myhuaweicloud.com": ("af-south-1", "cn-east-5", "la-north-2", "cn-southwest-3"),
}  # fmt: skip

REGION_HOSTS: dict[str, str] = {
    region: pattern.format(region=region) for pattern, regions in _PATTERNS.items() for region in regions
}

_HOSTNAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]*")
_USERINFO = re.compile(r"[^/?#]*@")  # from after "//" (or the start) to an @
_DEFAULT_PORTS = {"https": 443, "http": 80}
_ECHO_MAX = 60
_FORM = "https://host[:port]"


class UnknownRegion(KeyError):
    """A region that is not in ``REGION_HOSTS``; the key is the region as given."""


def endpoint_for_region(region: str) -> str:
    """The https base URL for ``region`` (``"cn-north-4" -> "https://gaussdb.cn-north-4.myhuaweicloud.com"``);
    raises ``UnknownRegion`` for a region not in the table."""
    try:
        return f"https://{REGION_HOSTS[region]}"
    except KeyError:
        raise UnknownRegion(region) from None


def iam_endpoint_for_region(region: str) -> str:
    """The IAM (token) base URL of ``region``: ``https://iam.{region}.myhuaweicloud.com``."""
    return f"https://iam.{region}.myhuaweicloud.com"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, any address in 127.0.0.0/8 and ``::1`` (host as in a URL, no brackets)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_endpoint(url: str) -> str:
    """The normalised base URL ``scheme://host[:port]`` of ``url``, or ``ValueError`` with one line saying
    what is wrong.

    Accepted: ``https://`` to a DNS name, an IPv4 address or a bracketed IPv6 address, with an optional
    port (1-65535) and at most a single trailing ``/``; ``http://`` only to a loopback host (127.0.0.0/8,
    ``::1``, ``localhost``), i.e. a local simulator, so tokens and signatures never cross a network in
    clear. Refused: a user or password (``user:pw@``), a path, a query, a fragment, whitespace, control or
    non-ASCII characters. Normalised: scheme and host lower-cased, IPv6 compressed, default port (443/80)
    and trailing ``/`` dropped: ``HTTPS://GaussDB.Example.COM:443/ -> https://gaussdb.example.com``.
    The message echoes the URL ``repr``-escaped, cut to 60 characters, with any user/password masked.
    """
    if not _PRINTABLE_ASCII.fullmatch(url):
        odd = next(c for c in url if not "\x21" <= c <= "\x7e")
        what = "a space" if odd == " " else f"the character U+{ord(odd):04X}"
        raise ValueError(f"must be a plain-ASCII {_FORM} URL without spaces; it has {what} {_got(url)}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError(f"must start with https:// {_got(url)}")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        raise ValueError(
            f"must not carry a user or password (user:password@); credentials come from the environment "
            f"{_got(url)}"
        )
    if "#" in tail:
        raise ValueError(f"must be {_FORM} with no fragment (#...) {_got(url)}")
    if "?" in tail:
        raise ValueError(f"must be {_FORM} with no query (?...) {_got(url)}")
    if tail not in ("", "/"):
        raise ValueError(f"must be {_FORM} with no path (the API paths are added per call) {_got(url)}")
    host, port = _host_port(authority, url)
    if scheme == "http" and not is_loopback_host(host):
        raise ValueError(f"plain http:// is only allowed for loopback hosts; use https:// {_got(url)}")
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        shown = f"{shown}:{port}"
    return f"{scheme}://{shown}"


def _host_port(authority: str, url: str) -> tuple[str, int | None]:
    """(host, port) of ``host[:port]`` or ``[v6][:port]``; the host lower-cased, IPv6 compressed."""
    if not authority:
        raise ValueError(f"has no host {_got(url)}")
    if authority.startswith("["):
        inside, sep, after = authority[1:].partition("]")
        if not sep or (after and not after.startswith(":")):
            raise ValueError(f"has a malformed [IPv6] host {_got(url)}")
        try:
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            raise ValueError(f"has a malformed [IPv6] host {_got(url)}") from None
        port_text: str | None = after[1:] if after else None
    else:
        host, sep, rest = authority.partition(":")
        port_text = rest if sep else None
        if port_text is not None and ":" in port_text:
            raise ValueError(f"has more than one ':' (an IPv6 host goes in brackets) {_got(url)}")
        host = host.lower()
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise ValueError(f"has an invalid host name {_got(url)}")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"has an invalid port (1-65535) {_got(url)}")
    return host, int(port_text)


def _got(url: str) -> str:
    """``(got '...')`` with a user/password part masked, so a secret never reaches an error line."""
    text = repr(_USERINFO.sub("***@", url))
    if len(text) > _ECHO_MAX:
        text = text[: _ECHO_MAX - 3] + "..."
    return f"(got {text})"
