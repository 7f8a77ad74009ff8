"""Our SDK-HMAC-SHA256 signer against the official SDK signer (a test-only dependency)."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

from orchestrator.cloud.signer import (
    SDK_DATE_FORMAT,
    canonical_query,
    canonical_uri,
    compute_signature,
    parse_authorization,
    sign_request,
    signed_header_names,
)

HOST = "gaussdb.cn-north-4.myhuaweicloud.com"
PROJECT = "054e292c9880d4992f02c0196d3ea468"
UPGRADE_PATH = (
    f"/v3/{PROJECT}/instances/517ea793ab91438cbfcd9c4b1c958b1ein07"
    "/proxy/0f46fc46396e4fb19a0cb52f578e9511po01/upgrade-version"
)
UPGRADE_BODY = b'{"source_version": "2.23.12.000", "target_version": "2.24.03.000"}'
VECTOR_SIGNATURE = "15a5aeffe61065878b7ff4c0cc1faa0c2af07a43847218197dcd064d76a5daee"


class _Keys:
    def __init__(self, ak: str, sk: str) -> None:
        self.ak = ak
        self.sk = sk


def sdk_sign(
    ak: str,
    sk: str,
    method: str,
    host: str,
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    body: bytes,
) -> dict[str, str]:
    request = SdkRequest(
        method=method,
        schema="https",
        host=host,
        resource_path=path,
        query_params=list(query),
        header_params=dict(headers),
        body=body,
    )
    signed: dict[str, str] = Signer(_Keys(ak, sk)).sign(request).header_params
    return signed


# --- the fixed vector -------------------------------------------------------------------------------


def test_vector_from_the_sdk_signs_host_too() -> None:
    headers = {
        "Content-Type": "application/json;charset=UTF-8",
        "X-Sdk-Date": "20240101T000000Z",
        "X-Project-Id": PROJECT,
        "Host": HOST,
    }
    signed = signed_header_names(headers)
    assert signed == ["content-type", "host", "x-project-id", "x-sdk-date"]
    signature = compute_signature("SKEXAMPLE", "POST", UPGRADE_PATH, [], headers, signed, UPGRADE_BODY)
    assert signature == VECTOR_SIGNATURE
    # The SDK agrees, and adds exactly that Host header itself.
    sdk = sdk_sign(
        "AKEXAMPLE",
        "SKEXAMPLE",
        "POST",
        HOST,
        UPGRADE_PATH,
        [],
        {k: v for k, v in headers.items() if k != "Host"},
        UPGRADE_BODY,
    )
    assert sdk["Host"] == HOST
    assert parse_authorization(sdk["Authorization"]) == ("AKEXAMPLE", signed, VECTOR_SIGNATURE)


def test_vector_through_sign_request() -> None:
    headers = {"Content-Type": "application/json;charset=UTF-8"}
    out = sign_request(
        "AKEXAMPLE",
        "SKEXAMPLE",
        "POST",
        f"https://{HOST}{UPGRADE_PATH}",
        headers,
        UPGRADE_BODY,
        now=datetime(2024, 1, 1, tzinfo=UTC),
        project_id=PROJECT,
    )
    assert out["X-Sdk-Date"] == "20240101T000000Z"
    assert out["Host"] == HOST
    assert out["X-Project-Id"] == PROJECT
    assert out["Authorization"] == (
        "SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders=content-type;host;x-project-id;x-sdk-date, "
        f"Signature={VECTOR_SIGNATURE}"
    )
    assert headers == {"Content-Type": "application/json;charset=UTF-8"}  # not mutated


# --- >= 1,000 generated requests against the SDK ----------------------------------------------------

_SEGMENT_PIECES = [
    "v3",
    "abc",
    "a b",
    "中文",
    "ü",
    "%",
    "%25",
    "%20",
    "~tilde",
    "a~b",
    "x+y",
    "q=1",
    "semi;colon",
    "é%C3%A9",
    "%2F",
    "!$&'()*",
    "@:",
    "-._",
    "",
    "100%",
    "%zz",
    "emoji🙂",
]
_QUERY_PIECES = [
    "",
    "a",
    "a b",
    "中",
    "ü=1",
    "+",
    "%",
    "%41",
    "~",
    "x&y",
    "k,v",
    "/slash",
    "🙂",
    "0",
    " lead",
    "trail ",
]
_HEADER_VALUES = [
    "x",
    "  padded  ",
    "ünïcödé",
    "a,b",
    "application/json",
    "1",
    "text with  spaces",
    "\tTab\t",
]
_CONTENT_TYPES = [
    "application/json;charset=UTF-8",
    "application/json",
    "application/bson",
    "text/plain",
    "application/octet-stream",
]


def _random_path(rng: random.Random) -> str:
    segments = [
        "".join(rng.choice(_SEGMENT_PIECES) for _ in range(rng.randint(1, 3)))
        for _ in range(rng.randint(0, 6))
    ]
    path = "/" + "/".join(segments)
    if rng.random() < 0.2:
        path += "/"
    if rng.random() < 0.3:  # sometimes already percent-encoded, as a client would send it
        path = quote(path, safe="/~%")
    return path


def _random_query(rng: random.Random) -> list[tuple[str, str]]:
    keys = ["limit", "offset", "id", "name", "k", "k k", "中", "A", "a", "z"]
    query = [(rng.choice(keys), rng.choice(_QUERY_PIECES)) for _ in range(rng.randint(0, 6))]
    if query and rng.random() < 0.5:
        query.append((query[0][0], rng.choice(_QUERY_PIECES)))  # repeated key
    return query


def _random_headers(rng: random.Random, when: datetime) -> dict[str, str]:
    headers = {"X-Sdk-Date": when.strftime(SDK_DATE_FORMAT)}
    if rng.random() < 0.8:
        headers["Content-Type"] = rng.choice(_CONTENT_TYPES)
    if rng.random() < 0.7:
        headers["X-Project-Id"] = PROJECT
    names = [
        "X-Language",
        "x-custom",
        "X-Trace-ID",
        "Accept",
        "User-Agent",
        "X_Underscore",
        "x_lower_underscore",
    ]
    for name in rng.sample(names, rng.randint(0, len(names))):
        headers[name] = rng.choice(_HEADER_VALUES)
    if rng.random() < 0.2:
        headers["X-Security-Token"] = "sts-" + "".join(rng.choices("abcdef0123456789", k=40))
    return headers


def _random_body(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.35:
        return b""
    if kind < 0.8:
        payload: dict[str, Any] = {
            "source_version": "2.23.12.000",
            "target_version": "2.24.03.000",
            "note": rng.choice(_QUERY_PIECES),
        }
        return json.dumps(payload, ensure_ascii=rng.random() < 0.5).encode("utf-8")
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))


def _random_case(rng: random.Random) -> dict[str, Any]:
    when = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 10 * 365 * 86400))
    host = rng.choice([HOST, "127.0.0.1:8443", "iam.ap-southeast-1.myhuaweicloud.com", "[::1]:9000"])
    return {
        "ak": "AK" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=18)),
        "sk": "".join(rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=40)),
        "method": rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "get", "post"]),
        "host": host,
        "path": _random_path(rng),
        "query": _random_query(rng),
        "headers": _random_headers(rng, when),
        "body": _random_body(rng),
        "when": when,
    }


CASES = 1500


def test_compute_signature_matches_sdk_on_generated_requests() -> None:
    rng = random.Random(20240101)
    for index in range(CASES):
        case = _random_case(rng)
        sdk = sdk_sign(
            case["ak"],
            case["sk"],
            case["method"],
            case["host"],
            case["path"],
            case["query"],
            case["headers"],
            case["body"],
        )
        sdk_ak, sdk_signed, sdk_signature = parse_authorization(sdk["Authorization"])
        # What the gateway sees: the SDK's headers minus Authorization (values as the SDK sent them).
        sent = {k: v.encode("iso-8859-1").decode("utf-8") for k, v in sdk.items() if k != "Authorization"}
        ours_signed = signed_header_names(sent)
        ours = compute_signature(
            case["sk"], case["method"], case["path"], case["query"], sent, ours_signed, case["body"]
        )
        assert (ours_signed, ours) == (sdk_signed, sdk_signature), (
            f"case {index}: {case['path']!r} {case['query']!r}"
        )
        assert sdk_ak == case["ak"]


def test_sign_request_matches_sdk_on_generated_requests() -> None:
    rng = random.Random(7)
    for index in range(CASES):
        case = _random_case(rng)
        base = {
            k: v
            for k, v in case["headers"].items()
            if k not in ("X-Sdk-Date", "X-Project-Id", "X-Security-Token")
        }
        project = case["headers"].get("X-Project-Id")
        token = case["headers"].get("X-Security-Token")
        url = f"https://{case['host']}{case['path']}"
        if case["query"]:
            url += "?" + canonical_query(case["query"])
        ours = sign_request(
            case["ak"],
            case["sk"],
            case["method"],
            url,
            base,
            case["body"],
            now=case["when"],
            project_id=project,
            security_token=token,
        )
        sdk_headers = dict(base, **{"X-Sdk-Date": case["when"].strftime(SDK_DATE_FORMAT)})
        if project:
            sdk_headers["X-Project-Id"] = project
        if token:
            sdk_headers["X-Security-Token"] = token
        sdk = sdk_sign(
            case["ak"],
            case["sk"],
            case["method"],
            case["host"],
            case["path"],
            case["query"],
            sdk_headers,
            case["body"],
        )
        assert parse_authorization(ours["Authorization"]) == parse_authorization(sdk["Authorization"]), (
            f"case {index}"
        )
        assert set(ours) == set(sdk)
        assert ours["Host"] == case["host"]


# --- the individual rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v3/p/instances", "/v3/p/instances/"),
        ("/v3/p/instances/", "/v3/p/instances/"),
        ("/", "/"),
        ("", "/"),
        ("/a b/中", "/a%20b/%E4%B8%AD/"),
        ("/a%20b/%E4%B8%AD", "/a%20b/%E4%B8%AD/"),
        ("/~x/a+b", "/~x/a%2Bb/"),
        ("/a%2Fb", "/a/b/"),  # the SDK decodes first, so an encoded slash splits the segment
        ("/100%", "/100%25/"),
    ],
)
def test_canonical_uri(path: str, expected: str) -> None:
    assert canonical_uri(path) == expected


def test_canonical_query_sorts_decoded_pairs_keeps_repeats_and_empty_values() -> None:
    query = [("limit", "100"), ("b", ""), ("a", "z z"), ("a", "y"), ("中", "~+")]
    assert canonical_query(query) == "a=y&a=z%20z&b=&limit=100&%E4%B8%AD=~%2B"
    assert canonical_query([]) == ""


def test_signed_header_names_lowercase_sorted_without_underscores() -> None:
    headers = {"X-Sdk-Date": "d", "Host": "h", "content-type": "c", "X_Custom": "u", "Accept": "a"}
    assert signed_header_names(headers) == ["accept", "content-type", "host", "x-sdk-date"]


def _reference(sk: str, canonical_request: str, date: str) -> str:
    to_sign = f"SDK-HMAC-SHA256\n{date}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
    return hmac.new(sk.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


def test_signature_follows_the_documented_canonical_request() -> None:
    headers = {"X-Sdk-Date": "20240102T030405Z", "Host": "h.example", "X-Language": "  en-us "}
    body = b'{"a": 1}'
    canonical = "\n".join(
        [
            "GET",
            "/v3/p/jobs/",
            "id=a%20b",
            "host:h.example\nx-language:en-us\nx-sdk-date:20240102T030405Z\n",
            "host;x-language;x-sdk-date",
            hashlib.sha256(body).hexdigest(),
        ]
    )
    signed = signed_header_names(headers)
    got = compute_signature("secret", "get", "/v3/p/jobs", [("id", "a b")], headers, signed, body)
    assert got == _reference("secret", canonical, "20240102T030405Z")


def test_unsigned_payload_header_replaces_the_body_hash() -> None:
    headers = {"X-Sdk-Date": "20240102T030405Z", "X-Sdk-Content-Sha256": "UNSIGNED-PAYLOAD"}
    signed = signed_header_names(headers)
    a = compute_signature("sk", "PUT", "/x", [], headers, signed, b"one body")
    b = compute_signature("sk", "PUT", "/x", [], headers, signed, b"another body")
    assert a == b
    out = sign_request(
        "ak", "sk", "PUT", "https://h/x", {"Content-Type": "text/plain"}, b"x", now=datetime(2024, 1, 1)
    )
    assert out["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    json_out = sign_request(
        "ak",
        "sk",
        "PUT",
        "https://h/x",
        {"Content-Type": "application/json"},
        b"{}",
        now=datetime(2024, 1, 1),
    )
    assert "X-Sdk-Content-Sha256" not in json_out


def test_any_change_breaks_the_signature() -> None:
    headers = {"X-Sdk-Date": "20240102T030405Z", "Host": "h"}
    signed = signed_header_names(headers)
    base = compute_signature("sk", "POST", "/a", [("k", "v")], headers, signed, b"body")
    variants = [
        compute_signature("sk2", "POST", "/a", [("k", "v")], headers, signed, b"body"),
        compute_signature("sk", "PUT", "/a", [("k", "v")], headers, signed, b"body"),
        compute_signature("sk", "POST", "/b", [("k", "v")], headers, signed, b"body"),
        compute_signature("sk", "POST", "/a", [("k", "w")], headers, signed, b"body"),
        compute_signature("sk", "POST", "/a", [("k", "v")], {**headers, "Host": "g"}, signed, b"body"),
        compute_signature(
            "sk", "POST", "/a", [("k", "v")], {**headers, "X-Sdk-Date": "20240102T030406Z"}, signed, b"body"
        ),
        compute_signature("sk", "POST", "/a", [("k", "v")], headers, signed, b"bodY"),
        compute_signature("sk", "POST", "/a", [("k", "v")], headers, ["host"], b"body"),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_compute_signature_errors_name_no_secret() -> None:
    with pytest.raises(ValueError, match="X-Sdk-Date") as missing_date:
        compute_signature("topsecretSK", "GET", "/", [], {"Host": "h"}, ["host"], b"")
    with pytest.raises(ValueError, match="'x-extra'") as missing_header:
        compute_signature("topsecretSK", "GET", "/", [], {"X-Sdk-Date": "20240101T000000Z"}, ["x-extra"], b"")
    with pytest.raises(ValueError, match="format"):
        compute_signature("topsecretSK", "GET", "/", [], {"X-Sdk-Date": "2024-01-01"}, ["x-sdk-date"], b"")
    assert "topsecretSK" not in str(missing_date.value) + str(missing_header.value)


def test_sign_request_host_port_date_and_replacements() -> None:
    base = {"x-sdk-date": "19990101T000000Z", "authorization": "stale", "X-Language": "en-us"}
    east = timezone(timedelta(hours=8))
    out = sign_request(
        "ak", "sk", "GET", "http://127.0.0.1:8080/v3/p/jobs?id=1", base, b"",
        now=datetime(2024, 1, 1, 8, 0, 0, tzinfo=east), security_token="sts",
    )  # fmt: skip
    assert out["Host"] == "127.0.0.1:8080"
    assert out["X-Sdk-Date"] == "20240101T000000Z"  # converted to UTC
    assert out["X-Security-Token"] == "sts"
    assert "x-sdk-date" not in out and "authorization" not in out
    assert "x-security-token" in parse_authorization(out["Authorization"])[1]
    assert base == {"x-sdk-date": "19990101T000000Z", "authorization": "stale", "X-Language": "en-us"}
    assert sign_request("a", "s", "GET", "https://h.example:443/x", {}, b"")["Host"] == "h.example"
    assert sign_request("a", "s", "GET", "http://h.example:80/x", {}, b"")["Host"] == "h.example"
    assert sign_request("a", "s", "GET", "https://h.example:80/x", {}, b"")["Host"] == "h.example:80"
    kept = sign_request("a", "s", "GET", "https://h.example/x", {"host": "virtual.example"}, b"")
    assert kept["host"] == "virtual.example" and "Host" not in kept


def test_sign_request_default_now_is_current_utc() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    out = sign_request("a", "s", "GET", "https://h/x", {}, b"")
    stamped = datetime.strptime(out["X-Sdk-Date"], SDK_DATE_FORMAT).replace(tzinfo=UTC)
    assert before <= stamped <= datetime.now(UTC)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer abc",
        "SDK-HMAC-SHA256 Access=ak, SignedHeaders=host",
        "SDK-HMAC-SHA256 Access=ak, SignedHeaders=host, Signature=",
        "SDK-HMAC-SHA256 Access=ak, SignedHeaders=host, Signature=ab, Extra=1",
        "SDK-HMAC-SHA256 Access=ak, Access=ak2, Signature=ab",
        "SDK-HMAC-SHA256 garbage",
    ],
)
def test_parse_authorization_rejects_malformed(value: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_authorization(value)
    assert "garbage" not in str(info.value)


def test_parse_authorization_reads_sign_request_output() -> None:
    out = sign_request(
        "MYAK", "s", "GET", "https://h/x", {"X-Language": "en-us"}, b"", now=datetime(2024, 1, 1)
    )
    ak, signed, signature = parse_authorization(out["Authorization"])
    assert ak == "MYAK"
    assert signed == ["host", "x-language", "x-sdk-date"]
    assert signature == compute_signature("s", "GET", "/x", [], out, signed, b"")
