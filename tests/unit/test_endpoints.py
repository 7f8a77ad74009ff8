"""cloud.endpoints: the region table and validate_endpoint, the one gate for every endpoint of a run.

No test connects anywhere: the addresses are only parsed (0.0.0.0, loopback and documentation hosts).
"""

from __future__ import annotations

import pytest

from orchestrator.cloud.endpoints import (
    REGION_HOSTS,
    UnknownRegion,
    endpoint_for_region,
    iam_endpoint_for_region,
    is_loopback_host,
    validate_endpoint,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://gaussdb.cn-north-4.myhuaweicloud.com/", "https://gaussdb.cn-north-4.myhuaweicloud.com"),
        ("https://GaussDB.example.com:8443", "https://gaussdb.example.com:8443"),
        ("HTTPS://GaussDB.Example.COM:443/", "https://gaussdb.example.com"),
        ("https://10.1.2.3", "https://10.1.2.3"),
        ("https://0.0.0.0:9", "https://0.0.0.0:9"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.5.6.7", "http://127.5.6.7"),
        ("http://localhost:80/", "http://localhost"),
        ("http://LOCALHOST:18080", "http://localhost:18080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://[0:0:0:0:0:0:0:1]", "http://[::1]"),
        ("https://[2001:db8:0::1]:443", "https://[2001:db8::1]"),
    ],
)
def test_accepted_and_normalised(url: str, expected: str) -> None:
    assert validate_endpoint(url) == expected
    assert validate_endpoint(expected) == expected  # normalising is idempotent


# (url, words the one-line message must contain): every kind of refusal names its reason
REFUSED = [
    ("http://gaussdb.example.com", "only allowed for loopback"),
    ("http://10.0.0.1:8080", "only allowed for loopback"),
    ("http://0.0.0.0:9", "only allowed for loopback"),
    ("http://127.0.0.1.nip.io", "only allowed for loopback"),
    ("http://[::ffff:127.0.0.1]", "only allowed for loopback"),
    ("https://host.example.com/v3", "no path"),
    ("https://host.example.com//", "no path"),
    ("http://127.0.0.1:9/api/", "no path"),
    ("https://host.example.com?x=1", "no query"),
    ("https://host.example.com/?x=1", "no query"),
    ("https://host.example.com#frag", "no fragment"),
    ("https://user:pw@host.example.com", "user or password"),
    ("https://user@host.example.com", "user or password"),
    ("http://user:pw@127.0.0.1:9", "user or password"),
    ("https://host\\@evil.com", "user or password"),
    ("https://host.example.com:0", "invalid port"),
    ("https://host.example.com:99999", "invalid port"),
    ("https://host.example.com:", "invalid port"),
    ("https://host.example.com:8o", "invalid port"),
    ("https://host .example.com", "a space"),
    ("https://exаmple.com", "U+0430"),  # Cyrillic a
    ("https://host.example.com\n", "U+000A"),
    ("ftp://host.example.com", "must start with https://"),
    ("host.example.com", "must start with https://"),
    ("//host.example.com", "must start with https://"),
    ("https://", "no host"),
    ("https://:443", "invalid host"),
    ("https://-bad-.example.com", "invalid host"),
    ("https://under_score.example.com", "invalid host"),
    ("https://" + "a" * 64 + ".example.com", "invalid host"),
    ("https://[::1", "malformed [IPv6]"),
    ("https://[zz::1]", "malformed [IPv6]"),
    ("https://[::1]x", "malformed [IPv6]"),
    ("https://a:1:2", "more than one ':'"),
]


@pytest.mark.parametrize(("url", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_a_one_line_reason(url: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_endpoint(url)
    text = str(info.value)
    assert words in text, text
    assert "\n" not in text and len(text) < 250


@pytest.mark.parametrize(
    "url",
    [
        "https://admin:s3cret-Pa55@host.example.com",
        "admin:s3cret-Pa55@host.example.com",
        "http://u:s3cret-Pa55@[::1]",
    ],
)
def test_a_password_never_reaches_the_message(url: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_endpoint(url)
    assert "s3cret-Pa55" not in str(info.value)
    assert "***@" in str(info.value)


def test_loopback_hosts() -> None:
    assert all(is_loopback_host(h) for h in ("localhost", "LocalHost", "127.0.0.1", "127.255.0.9", "::1"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "10.0.0.1", "localhost.example.com", "::", "::2"))


@pytest.mark.parametrize("region", sorted(REGION_HOSTS))
def test_every_region_resolves_to_a_valid_https_endpoint(region: str) -> None:
    url = endpoint_for_region(region)
    assert url == f"https://{REGION_HOSTS[region]}"
    assert validate_endpoint(url) == url
    assert validate_endpoint(iam_endpoint_for_region(region)) == f"https://iam.{region}.myhuaweicloud.com"


def test_unknown_region() -> None:
    with pytest.raises(UnknownRegion):
        endpoint_for_region("xx-nowhere-1")
