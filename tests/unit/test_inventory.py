"""Inventory loading: every rule of docs/inventory.md, checked through real files on disk."""

from __future__ import annotations

import hashlib
import pickle
import secrets
import time
import tracemalloc
from pathlib import Path

import pytest

from orchestrator import versions
from orchestrator.cloud import endpoints
from orchestrator.cloud.endpoints import REGION_HOSTS
from orchestrator.inventory import (
    MAX_LISTED,
    Inventory,
    InventoryError,
    InventoryErrors,
    ProxyEntry,
    file_sha256,
    load_inventory,
    normalize_endpoint,
    summarize,
    version_key,
)

BAD = Path(__file__).parent / "bad_inventories"
REPO = Path(__file__).resolve().parents[2]

PROJECT = "054e292c9880d4992f02c0196d3ea468"
INSTANCE = "517ea793ab91438cbfcd9c4b1c958b1ein07"
PROXY = "0f46fc46396e4fb19a0cb52f578e9511po01"
PROXY2 = "135c2ec1cd21a338e7c8754af26ebe7apo01"


def _errors(path: Path | str, **kwargs: str | None) -> list[InventoryError]:
    with pytest.raises(InventoryErrors) as info:
        load_inventory(path, **kwargs)
    return info.value.errors


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _yaml(proxies: str, defaults: str = "", extra: str = "") -> str:
    head = f"defaults:\n{defaults}" if defaults else ""
    return f"{head}proxies:\n{proxies}{extra}"


# ------------------------------------------------------------------------------------ malformed files

# (fixture, line, field, a piece of the message); each file holds exactly one mistake.
MALFORMED = [
    (
        "id_slash.yaml",
        9,
        "proxies[1].proxy_id",
        "must be 32 letters/digits plus an optional suffix like po01 (got 'abc/../x')",
    ),
    ("id_dotdot.yaml", 6, "proxies[0].instance_id", "(got '../517ea793"),
    ("wrong_suffix.yaml", 7, "proxies[0].proxy_id", "'in07', which marks an instance id"),
    ("suffix_shape.yaml", 7, "proxies[0].proxy_id", "optional suffix like po01 (got '0f46fc46396e4fb"),
    ("float_version.yaml", 8, "proxies[0].target_version", "quote it: target_version: '2.24'"),
    (
        "target_below_source.yaml",
        9,
        "proxies[0].target_version",
        "target '2.23.12.000' is lower than source_version '2.24.03.000' (proxies[0].source_version, line 8)",
    ),
    (
        "duplicate_pair.yaml",
        10,
        "proxies[2]",
        "same project_id, instance_id and proxy_id as proxies[0] on line 6",
    ),
    ("unknown_key.yaml", 8, "proxies[0].target_verison", "unknown key; did you mean 'target_version'?"),
    ("duplicate_key.yaml", 8, "proxies[0].proxy_id", "duplicate key (first on line 7)"),
    ("unquoted_no.yaml", 8, "proxies[0].x_language", "unquoted 'no' is read by YAML 1.1 as boolean False"),
    ("http_public.yaml", 8, "proxies[0].endpoint", "plain http:// is only allowed for loopback hosts"),
    ("endpoint_path.yaml", 8, "proxies[0].endpoint", "with no path"),
    ("unknown_region.yaml", 3, "defaults.region", "unknown region 'cn-nort-4'"),
    ("missing_proxy_id.yaml", 8, "proxies[1].proxy_id", "required (set it in the entry or in defaults)"),
    ("top_level_list.yaml", 2, None, "top level must be a mapping with a 'proxies' list, not a list"),
    ("lookalike.yaml", 2, "defaults.project_id", "with non-ASCII U+0430"),
    ("not_utf8.yaml", 8, None, "not UTF-8 text (byte 0xe9 at column 14)"),
    ("unknown_top_key.yaml", 8, "polcy", "did you mean 'policy'?"),
    ("instance_in_defaults.yaml", 3, "defaults.instance_id", "is set per proxy, not in defaults"),
    ("syntax_error.yaml", 7, None, "not valid YAML"),
    ("unknown_column.csv", 1, "proxyid", "unknown column; did you mean 'proxy_id'?"),
    ("missing_column.csv", 2, "proxy_id", "required column missing"),
    ("bad_version_line7.csv", 7, "target_version", "(got '2.24.03.000-rc1')"),
    ("not_utf8.csv", 3, None, "not UTF-8 text (byte 0xe9"),
    ("cell_count.csv", 3, None, "has 4 cells but the header has 5 columns"),
    ("duplicate_pair.csv", 4, None, "duplicate proxy: same project_id, instance_id and proxy_id as line 2"),
    ("multiline_cell.csv", 3, "proxy_id", "(got '135c2ec1cd21a338e7c8754af26ebe7apo01\\n/../x')"),
]


@pytest.mark.parametrize(("name", "line", "field", "fragment"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_inventory_names_file_line_and_field(
    name: str, line: int, field: str | None, fragment: str
) -> None:
    path = BAD / name
    errors = _errors(path)
    assert len(errors) == 1, [str(e) for e in errors]  # one mistake, one message: no follow-on noise
    err = errors[0]
    assert (err.path, err.line, err.field) == (str(path), line, field)
    prefix = f"{path}:{line}: {field}: " if field else f"{path}:{line}: "
    text = str(err)
    assert text.startswith(prefix), text
    assert fragment in err.message
    assert "\n" not in text and "\r" not in text


def test_empty_file_has_no_line(tmp_path: Path) -> None:
    for name, text in [("empty.yaml", ""), ("comments.yaml", "# nothing here\n\n"), ("empty.csv", "# x\n\n")]:
        path = _write(tmp_path, name, text)
        (err,) = _errors(path)
        assert err.line is None
        assert str(err).startswith(f"{path}: file is empty")
    assert str(_errors(BAD / "empty.yaml")[0]) == (
        f"{BAD / 'empty.yaml'}: file is empty; expected a mapping with a 'proxies' list"
    )


def test_several_problems_are_all_reported_in_line_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "many.yaml",
        _yaml(
            f"  - {{instance_id: {INSTANCE}, proxy_id: bad/1}}\n"
            f"  - {{instance_id: {INSTANCE}, proxy_id: {PROXY}, x_language: off}}\n",
            defaults=f"  project_id: {PROJECT}\n  region: cn-north-4\n  target_version: 2.24\n",
        ),
    )
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    err = info.value
    assert isinstance(err, InventoryErrors)
    assert [(e.line, e.field) for e in err.errors] == [
        (4, "defaults.target_version"),
        (6, "proxies[0].proxy_id"),
        (7, "proxies[1].x_language"),
    ]
    assert str(err) == f"{err.errors[0]} (and 2 more)"
    assert (err.path, err.line, err.field) == (str(path), 4, "defaults.target_version")


def test_a_bad_default_is_reported_once_not_per_entry(tmp_path: Path) -> None:
    proxies = "".join(
        f"  - {{instance_id: {INSTANCE}, proxy_id: {secrets.token_hex(16)}po01}}\n" for _ in range(50)
    )
    path = _write(
        tmp_path,
        "d.yaml",
        _yaml(proxies, f"  project_id: {PROJECT}\n  regoin: cn-north-4\n  target_version: '2.24.03.000'\n"),
    )
    (err,) = _errors(path)
    assert (err.line, err.field) == (3, "defaults.regoin")
    assert "did you mean 'region'?" in err.message


def test_echoed_values_are_truncated_and_escaped(tmp_path: Path) -> None:
    hostile = "a" * 500 + "\\u2028\\nX"
    path = _write(
        tmp_path,
        "h.yaml",
        _yaml(
            f'  - {{project_id: "{hostile}", instance_id: {INSTANCE}, proxy_id: {PROXY}, region: cn-north-4, '
            "target_version: '2.24.03.000'}\n"
        ),
    )
    (err,) = _errors(path)
    text = str(err)
    assert "\n" not in text and "\u2028" not in text
    assert len(err.message) < 120
    assert text.endswith("aaa..., with non-ASCII U+2028)")


def test_errors_pickle_for_multiprocessing_and_logging() -> None:
    (err,) = _errors(BAD / "id_slash.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    group = pickle.loads(pickle.dumps(InventoryErrors([err, err])))
    assert str(group) == f"{err} (and 1 more)"


# ------------------------------------------------------------------------------------ YAML 1.1 traps


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("yes", "boolean True"),
        ("on", "boolean True"),
        ("No", "boolean False"),
        ("0443", "read by YAML as a number"),
        ("2", "read by YAML as a number"),
        ("[en-us]", "must be a single value, not a list"),
        ("!!binary aGk=", "must be a plain string"),
    ],
)
def test_yaml_values_that_are_not_strings_are_refused(tmp_path: Path, value: str, fragment: str) -> None:
    path = _write(
        tmp_path,
        "t.yaml",
        _yaml(
            f"  - project_id: {PROJECT}\n    instance_id: {INSTANCE}\n    proxy_id: {PROXY}\n"
            f"    region: cn-north-4\n    target_version: '2.24.03.000'\n    name: {value}\n"
        ),
    )
    (err,) = _errors(path)
    assert (err.line, err.field) == (7, "proxies[0].name")
    assert fragment in err.message


def test_duplicate_keys_anywhere_are_refused_with_their_path(tmp_path: Path) -> None:
    good = (
        f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, region: cn-north-4, "
        "target_version: '2.24.03.000'}\n"
    )
    path = _write(tmp_path, "k.yaml", _yaml(good, extra="policy:\n  retry:\n    max: 3\n    max: 4\n"))
    (err,) = _errors(path)
    assert (err.line, err.field) == (6, "policy.retry.max")
    path = _write(tmp_path, "top.yaml", _yaml(good) + _yaml(good))
    (err,) = _errors(path)
    assert (err.line, err.field) == (3, "proxies")
    assert "first on line 1" in err.message


def test_merge_keys_anchors_and_all_digit_ids(tmp_path: Path) -> None:
    digits = "1" * 32
    path = _write(
        tmp_path,
        "m.yaml",
        (
            "proxies:\n"
            f"  - &base {{project_id: {digits}, instance_id: {INSTANCE}, proxy_id: {PROXY},\n"
            "           region: cn-north-4, target_version: '2.24.03.000', name: base}\n"
            "  - <<: *base\n"
            f"    proxy_id: {PROXY2}\n"
            "    name: merged\n"
        ),
    )
    first, second = load_inventory(path).entries()
    assert first.project_id == digits  # an unquoted all-digit ID stays the text written, not an int
    assert (second.project_id, second.instance_id, second.proxy_id, second.name, second.line) == (
        digits,
        INSTANCE,
        PROXY2,
        "merged",
        4,
    )


def test_the_same_entry_twice_through_an_alias_is_a_duplicate(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "a.yaml",
        (
            f"proxies:\n  - &p {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, "
            "region: cn-north-4, target_version: '2.24.03.000'}\n  - *p\n"
        ),
    )
    (err,) = _errors(path)
    assert err.field == "proxies[1]" and "as proxies[0] on line 2" in err.message


def test_duplicate_detection_ignores_case(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "c.csv",
        (
            "project_id,instance_id,proxy_id,region,target_version\n"
            f"{PROJECT},{INSTANCE},{PROXY},cn-north-4,2.24.03.000\n"
            f"{PROJECT.upper()},{INSTANCE},{PROXY},cn-north-4,2.24.03.000\n"
        ),
    )
    (err,) = _errors(path)
    assert err.line == 3 and "as line 2" in err.message


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("proxies: []\n", 1, "non-empty list of proxies, not an empty list"),
        ("defaults: {}\n", 1, "required: a list of proxies"),
        ("proxies:\n  - just-a-string\n", 2, "must be a mapping of proxy fields"),
        ("proxies: {a: 1}\n", 1, "non-empty list of proxies, not a mapping"),
        ("plain words\n", 1, "top level must be a mapping"),
        ("a: 1\n---\nb: 2\n", 2, "not valid YAML"),
        ('a: "\x07"\n', 1, "not valid YAML"),
    ],
)
def test_structural_yaml_errors(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = _write(tmp_path, "s.yaml", text)
    errors = _errors(path)
    assert errors[0].line == line
    assert fragment in errors[0].message


# ------------------------------------------------------------------------------------------ good YAML


def test_defaults_apply_and_entries_override_them(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "g.yaml",
        _yaml(
            f"  - instance_id: {INSTANCE}\n    proxy_id: {PROXY}\n"
            f"  - instance_id: {INSTANCE}\n    proxy_id: {PROXY2}\n    region: ap-southeast-1\n"
            "    target_version: '2.25.01.000'\n    source_version: null\n    x_language: zh-cn\n"
            "    name: the second one\n",
            defaults=f"  project_id: {PROJECT}\n  region: cn-north-4\n  source_version: '2.23.12.000'\n"
            "  target_version: '2.24.03.000'\n",
        ),
    )
    inv = load_inventory(path)
    assert (inv.format, inv.count, inv.path) == ("yaml", 2, str(path))
    a, b = inv.entries()
    assert a == ProxyEntry(
        PROJECT,
        INSTANCE,
        PROXY,
        "cn-north-4",
        "https://gaussdb.cn-north-4.myhuaweicloud.com",
        "2.23.12.000",
        "2.24.03.000",
        "en-us",
        None,
        7,
    )
    assert b == ProxyEntry(
        PROJECT,
        INSTANCE,
        PROXY2,
        "ap-southeast-1",
        "https://gaussdbformysql.ap-southeast-1.myhuaweicloud.com",
        None,
        "2.25.01.000",
        "zh-cn",
        "the second one",
        9,
    )


@pytest.mark.parametrize("region", sorted(REGION_HOSTS))
def test_every_region_in_the_table_resolves_to_its_host(tmp_path: Path, region: str) -> None:
    path = _write(
        tmp_path,
        "r.yaml",
        _yaml(
            f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, region: {region}, "
            "target_version: '2.24.03.000'}\n"
        ),
    )
    (entry,) = load_inventory(path).entries()
    assert entry.endpoint == f"https://{REGION_HOSTS[region]}"


def test_explicit_endpoint_wins_and_allows_a_region_outside_the_table(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "e.yaml",
        _yaml(
            f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, region: eu-west-101, "
            "endpoint: 'HTTPS://GaussDB.Example.COM:443/', target_version: '2.24.03.000'}\n"
            f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY2}, region: cn-north-4, "
            "endpoint: 'http://127.0.0.1:8443', target_version: '2.24.03.000'}\n"
        ),
    )
    a, b = load_inventory(path).entries()
    assert (a.region, a.endpoint) == ("eu-west-101", "https://gaussdb.example.com")
    assert (b.region, b.endpoint) == ("cn-north-4", "http://127.0.0.1:8443")


def test_endpoint_override_replaces_every_endpoint_and_makes_region_optional(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "o.yaml",
        _yaml(
            f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY},\n"
            "      target_version: '2.24.03.000'}\n"
            f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY2},\n"
            "      region: xx-nowhere-1, endpoint: https://elsewhere.example.com,\n"
            "      target_version: '2.24.03.000'}\n"
        ),
    )
    (err,) = _errors(path)
    assert (err.line, err.field) == (2, "proxies[0].region")
    assert "one of region or endpoint is required" in err.message
    inv = load_inventory(path, endpoint_override="http://localhost:18080/")
    assert [(e.region, e.endpoint) for e in inv.entries()] == [
        (None, "http://localhost:18080"),
        ("xx-nowhere-1", "http://localhost:18080"),
    ]


def test_a_bad_endpoint_override_is_refused(tmp_path: Path) -> None:
    (err,) = _errors(REPO / "inventories" / "example.yaml", endpoint_override="http://10.0.0.8:8080")
    assert (err.line, err.field) == (None, "--endpoint")
    assert str(err).startswith(f"{REPO / 'inventories' / 'example.yaml'}: --endpoint: plain http://")


def test_policy_block_is_kept_raw_with_its_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "p.yaml",
        _yaml(
            f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, region: cn-north-4, "
            "target_version: '2.24.03.000'}\n",
            extra="\npolicy:\n  max_attempts: 5\n  rules: [{code: DBS.200019, action: retry, delay: 1.5}]\n"
            "  unknown_to_us: true\n  nothing: ~\n",
        ),
    )
    inv = load_inventory(path)
    assert inv.policy_line == 4
    assert inv.policy == {
        "max_attempts": 5,
        "rules": [{"code": "DBS.200019", "action": "retry", "delay": 1.5}],
        "unknown_to_us": True,
        "nothing": None,
    }
    assert dict(inv.policy_lines) == {
        "": 5,
        "max_attempts": 5,
        "rules": 6,
        "rules[0]": 6,
        "rules[0].code": 6,
        "rules[0].action": 6,
        "rules[0].delay": 6,
        "unknown_to_us": 7,
        "nothing": 8,
    }
    no_policy = _write(tmp_path, "n.yaml", path.read_text().split("\npolicy:")[0] + "\npolicy:\n")
    assert (load_inventory(no_policy).policy, load_inventory(no_policy).policy_line) == (None, None)
    bad = _write(tmp_path, "b.yaml", path.read_text().split("\npolicy:")[0] + "\npolicy: [1]\n")
    (err,) = _errors(bad)
    assert (err.line, err.field) == (4, "policy")


def test_sha256_is_of_the_file_bytes_and_entries_are_re_iterable() -> None:
    path = REPO / "inventories" / "example.yaml"
    inv = load_inventory(path)
    assert inv.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(inv.entries()) == list(inv.entries())
    assert len(list(inv.entries())) == inv.count == 4


@pytest.mark.parametrize("name", ["example.yaml", "example.csv", "multi-project.yaml"])
def test_shipped_examples_are_valid(name: str) -> None:
    inv = load_inventory(REPO / "inventories" / name)
    entries = list(inv.entries())
    assert len(entries) == inv.count > 0
    assert all(e.endpoint and e.endpoint.startswith("https://") for e in entries)


# ------------------------------------------------------------------------------------------------ CSV

CSV_HEADER = "project_id,instance_id,proxy_id,region,source_version,target_version,name\n"


def test_csv_comments_blank_lines_bom_and_quoted_cells(tmp_path: Path) -> None:
    text = (
        "# leading comment\n\n"
        + CSV_HEADER
        + "  # indented comment\n"
        + f'{PROJECT},{INSTANCE},{PROXY},cn-north-4,2.23.12.000,2.24.03.000,"orders, primary"\n'
        + "\n"
        + f"{PROJECT}, {INSTANCE} ,{PROXY2},,,2.24.03.000,\n"
    )
    path = tmp_path / "c.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    (err,) = _errors(path)
    assert (err.line, err.field) == (7, "region")  # neither region nor endpoint in that row
    inv = load_inventory(path, endpoint_override="https://gaussdb.example.com")
    a, b = inv.entries()
    assert (a.name, a.line, a.source_version, a.region) == ("orders, primary", 5, "2.23.12.000", "cn-north-4")
    assert (b.instance_id, b.name, b.source_version, b.line) == (INSTANCE, None, None, 7)
    assert inv.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (inv.format, inv.count, inv.policy, inv.policy_line) == ("csv", 2, None, None)


def test_csv_columns_in_any_order_with_a_duplicate_and_an_empty_name(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "o.csv",
        f"target_version,proxy_id,instance_id,project_id,endpoint\n"
        f"2.24.03.000,{PROXY},{INSTANCE},{PROJECT},https://h.example.com/\n",
    )
    (entry,) = load_inventory(path).entries()
    assert (entry.proxy_id, entry.endpoint, entry.region) == (PROXY, "https://h.example.com", None)
    path = _write(tmp_path, "d.csv", "project_id,instance_id,proxy_id,proxy_id,,target_version,region\n")
    errors = _errors(path)
    assert [(e.line, e.field) for e in errors] == [(1, "proxy_id"), (1, "column 5")]
    assert "columns 3 and 4" in errors[0].message


def test_csv_without_region_or_endpoint_column_needs_the_override(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "n.csv",
        f"project_id,instance_id,proxy_id,target_version\n{PROJECT},{INSTANCE},{PROXY},2.24.03.000\n",
    )
    (err,) = _errors(path)
    assert (err.line, err.field, err.message) == (
        1,
        "region",
        "needs a region or endpoint column (or --endpoint)",
    )
    (entry,) = load_inventory(path, endpoint_override="http://[::1]:9000").entries()
    assert entry.endpoint == "http://[::1]:9000"


def test_csv_header_only_is_refused(tmp_path: Path) -> None:
    (err,) = _errors(_write(tmp_path, "h.csv", CSV_HEADER))
    assert "no proxies" in err.message


def test_csv_entries_stream_again_and_notice_a_changed_file(tmp_path: Path) -> None:
    rows = "".join(
        f"{PROJECT},{INSTANCE},{secrets.token_hex(16)}po01,cn-north-4,,2.24.03.000,\n" for _ in range(3)
    )
    path = _write(tmp_path, "s.csv", CSV_HEADER + rows)
    inv = load_inventory(path)
    first = list(inv.entries())
    assert first == list(inv.entries()) and len(first) == 3
    path.write_text(CSV_HEADER + rows + f"{PROJECT},{INSTANCE},{PROXY},cn-north-4,,2.24.03.000,\n")
    it = inv.entries()
    with pytest.raises(InventoryErrors, match="changed since it was validated"):
        next(it)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    (err,) = _errors(_write(tmp_path, "x.json", "{}"))
    assert "use .yaml, .yml or .csv" in err.message
    (err,) = _errors(tmp_path / "absent.yml")
    assert "cannot read the file" in err.message


# ------------------------------------------------------------------------------------------ functions


def test_version_key_and_normalize_endpoint_are_the_shared_ones() -> None:
    # kept importable from here; their tables live in test_versions.py and test_endpoints.py
    assert version_key is versions.version_key
    assert normalize_endpoint is endpoints.validate_endpoint


def test_equal_versions_are_allowed(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "eq.csv", CSV_HEADER + f"{PROJECT},{INSTANCE},{PROXY},cn-north-4,2.24.3,2.24.03.000,\n"
    )
    assert load_inventory(path).count == 1


@pytest.mark.parametrize(
    "bad_id",
    [
        PROXY + "\n",
        PROXY[:-1],
        "0f46fc46396e4fb19a0cb52f578e951%2F01",
        "0f46fc46396e4fb19a0cb52f578e9511po01?x",
        "0f46fc46396e4fb19a0cb52f578e9511-po01",
        "0f46fc46396e4fb19a0cb52f578e９511po01",  # full-width digit
        "0f46fc46-396e-4fb1-9a0c-b52f578e9511",
    ],
)
def test_ids_that_could_bend_a_url_are_refused(tmp_path: Path, bad_id: str) -> None:
    path = tmp_path / "i.csv"
    path.write_text(
        CSV_HEADER + f'{PROJECT},{INSTANCE},"{bad_id}",cn-north-4,,2.24.03.000,\n', encoding="utf-8"
    )
    (err,) = _errors(path)
    assert err.field == "proxy_id"


def test_name_rules(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "n.csv", CSV_HEADER + f"{PROJECT},{INSTANCE},{PROXY},cn-north-4,,2.24.03.000,{'x' * 129}\n"
    )
    (err,) = _errors(path)
    assert (err.line, err.field, err.message) == (2, "name", "must be at most 128 characters (got 129)")
    path = _write(
        tmp_path, "u.csv", CSV_HEADER + f"{PROJECT},{INSTANCE},{PROXY},cn-north-4,,2.24.03.000,数据库 α\n"
    )
    assert next(load_inventory(path).entries()).name == "数据库 α"


def test_summarize_lists_scope(tmp_path: Path) -> None:
    text = summarize(load_inventory(REPO / "inventories" / "multi-project.yaml"))
    lines = text.splitlines()
    assert "proxies:   5 on 5 instance(s) in 3 project(s)" in lines
    assert "  2.23.12.000 -> 2.24.03.000  3" in lines
    assert "  2.23.12.000 -> 2.23.12.100  1" in lines
    assert any(
        line.split() == ["ap-southeast-1", "https://gaussdbformysql.ap-southeast-1.myhuaweicloud.com", "2"]
        for line in lines
    )
    assert lines[-1] == "policy:    line 40"
    csv_text = summarize(load_inventory(REPO / "inventories" / "example.csv"))
    assert "  (current) -> 2.24.03.000  1" in csv_text.splitlines()


def test_inventory_repr_has_no_entries_blob() -> None:
    inv = load_inventory(REPO / "inventories" / "example.yaml")
    assert isinstance(inv, Inventory)
    assert "ProxyEntry" not in repr(inv) and len(repr(inv)) < 300


# ------------------------------------------------------------------------------------------------ speed


def test_ten_thousand_entries_load_quickly(tmp_path: Path) -> None:
    n = 10_000
    ids = [(secrets.token_hex(16) + "in07", secrets.token_hex(16) + "po01") for _ in range(n)]
    yaml_path = _write(
        tmp_path,
        "big.yaml",
        _yaml(
            "".join(
                f"  - instance_id: {i}\n    proxy_id: {p}\n    name: proxy {k}\n"
                for k, (i, p) in enumerate(ids)
            ),
            defaults=f"  project_id: {PROJECT}\n  region: cn-north-4\n  source_version: '2.23.12.000'\n"
            "  target_version: '2.24.03.000'\n",
        ),
    )
    csv_path = _write(
        tmp_path,
        "big.csv",
        CSV_HEADER
        + "".join(
            f"{PROJECT},{i},{p},cn-north-4,2.23.12.000,2.24.03.000,proxy {k}\n"
            for k, (i, p) in enumerate(ids)
        ),
    )
    for path in (yaml_path, csv_path):
        start = time.perf_counter()
        inv = load_inventory(path)
        assert sum(1 for _ in inv.entries()) == inv.count == n
        # Measured here: YAML ~1.8 s, CSV ~1.1 s (load + one pass of entries). A generous ceiling catches
        # an accidental quadratic step without making the test flaky on a slow machine.
        assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------- window and notify

GOOD = (
    f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, region: cn-north-4, "
    "target_version: '2.24.03.000'}\n"
)
HOOK = "https://hooks.example.com/services/T0/B0/s3cret-token?x=1"


def test_window_and_notify_are_kept_with_their_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "w.yaml", _yaml(GOOD, extra=f"window: 'Sat 22:00-06:00 Europe/Berlin'\nnotify: {HOOK}\n")
    )
    inv = load_inventory(path)
    assert (inv.window, inv.window_line) == ("Sat 22:00-06:00 Europe/Berlin", 3)
    assert (inv.notify, inv.notify_line) == (HOOK, 4)
    assert "s3cret-token" not in repr(inv)
    lines = summarize(inv).splitlines()
    assert "window:    Sat 22:00-06:00 Europe/Berlin  (line 3)" in lines
    assert "notify:    https://hooks.example.com/...  (line 4)" in lines
    assert "s3cret-token" not in "\n".join(lines)
    plain = load_inventory(_write(tmp_path, "p.yaml", _yaml(GOOD)))
    assert (plain.window, plain.window_line, plain.notify, plain.notify_line) == (None, None, None, None)
    http_local = _write(tmp_path, "l.yaml", _yaml(GOOD, extra="notify: http://127.0.0.1:9/hook\n"))
    assert load_inventory(http_local).notify == "http://127.0.0.1:9/hook"


@pytest.mark.parametrize(
    ("extra", "field", "fragment"),
    [
        ("window: 22:00\n", "window", "read by YAML as a number; quote it"),
        ("window: [sat]\n", "window", "must be a single value, not a list"),
        ("window: ''\n", "window", "must not be empty"),
        ('window: "sat\\t22:00"\n', "window", "must be one line"),
        ("window: yes\n", "window", "boolean True"),
        ("notify: http://hooks.example.com/s3cret-token\n", "notify", "only allowed for loopback"),
        ("notify: ftp://hooks.example.com/s3cret-token\n", "notify", "must be an https://host/... URL"),
        ("notify: 'https://u:s3cret-token@hooks.example.com/x'\n", "notify", "user or password"),
        ("notify: https:///s3cret-token\n", "notify", "must be an https://host/... URL"),
        ("notify: 'https://hooks.example.com:99999/s3cret-token'\n", "notify", "not a valid URL"),
        ('notify: "https://hooks.example.com/s3cret token"\n', "notify", "without spaces"),
        ("notify: {url: x}\n", "notify", "must be a single value, not a mapping"),
        ("notify: ~\n", "notify", "must not be empty"),
    ],
)
def test_window_and_notify_errors(tmp_path: Path, extra: str, field: str, fragment: str) -> None:
    (err,) = _errors(_write(tmp_path, "x.yaml", _yaml(GOOD, extra=extra)))
    assert (err.line, err.field) == (3, field)
    assert fragment in err.message
    assert "s3cret-token" not in str(err)  # a webhook's token never reaches an error line


# ----------------------------------------------------------------------------- streaming and hashes


def test_file_sha256_is_the_inventory_hash_without_parsing(tmp_path: Path) -> None:
    for name in ("example.yaml", "example.csv"):
        path = REPO / "inventories" / name
        assert (
            file_sha256(path) == load_inventory(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        )
    broken = _write(tmp_path, "broken.yaml", "proxies: [")
    assert file_sha256(broken) == hashlib.sha256(b"proxies: [").hexdigest()  # no parsing: no error


def test_yaml_entries_stream_again_and_notice_a_changed_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "s.yaml", _yaml(GOOD + GOOD.replace(PROXY, PROXY2)))
    inv = load_inventory(path)
    first = list(inv.entries())
    assert first == list(inv.entries()) and [e.proxy_id for e in first] == [PROXY, PROXY2]
    path.write_text(path.read_text() + "# a comment changes the bytes\n")
    with pytest.raises(InventoryErrors, match="changed since it was validated"):
        next(inv.entries())
    path.unlink()
    with pytest.raises(InventoryErrors, match="cannot read the file"):
        next(inv.entries())


def test_entries_are_streamed_not_held(tmp_path: Path) -> None:
    # Iterating 20,000 entries allocates one entry at a time: a list of them would be several MB.
    n = 20_000
    proxies = "".join(
        f"  - {{instance_id: {k:032x}in07, proxy_id: {k:032x}po01, name: proxy number {k}}}\n"
        for k in range(n)
    )
    defaults = f"  project_id: {PROJECT}\n  region: cn-north-4\n  target_version: '2.24.03.000'\n"
    path = _write(tmp_path, "big.yaml", _yaml(proxies, defaults))
    inv = load_inventory(path)
    tracemalloc.start()
    try:
        count = sum(1 for _ in inv.entries())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == inv.count == n
    assert peak < 2_000_000, peak


def test_defaults_after_the_entries_still_apply(tmp_path: Path) -> None:
    defaults = f"defaults:\n  project_id: {PROJECT}\n  region: cn-north-4\n  target_version: '2.24.03.000'\n"
    entries = (
        f"proxies:\n  - instance_id: {INSTANCE}\n    proxy_id: {PROXY}\n"
        f"  - instance_id: {INSTANCE}\n    proxy_id: bad\n"
    )
    before = _errors(_write(tmp_path, "before.yaml", defaults + entries))
    after = _errors(_write(tmp_path, "after.yaml", entries + defaults))
    assert [(e.line, e.field, e.message) for e in before] == [(9, "proxies[1].proxy_id", before[0].message)]
    assert [(e.line, e.field, e.message) for e in after] == [(5, "proxies[1].proxy_id", before[0].message)]
    assert before[0].message.startswith("must be 32 letters/digits")
    good = entries.replace("proxy_id: bad", f"proxy_id: {PROXY2}")
    inv = load_inventory(_write(tmp_path, "ok.yaml", good + defaults))
    assert [(e.project_id, e.target_version, e.line) for e in inv.entries()] == [
        (PROJECT, "2.24.03.000", 2),
        (PROJECT, "2.24.03.000", 4),
    ]


def test_bom_and_crlf_yaml(tmp_path: Path) -> None:
    path = tmp_path / "crlf.yaml"
    text = _yaml(GOOD + f"  - instance_id: {INSTANCE}\n    proxy_id: x\n")
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    errors = _errors(path)
    assert [(e.line, e.field) for e in errors] == [
        (3, "proxies[1].project_id"),
        (3, "proxies[1].target_version"),
        (4, "proxies[1].proxy_id"),
    ]
    assert errors[2].message.startswith(
        "must be 32 letters/digits plus an optional suffix like po01 (got 'x')"
    )


# ---------------------------------------------------------------- every YAML spelling reads the same


def test_plain_flow_quoted_tagged_anchored_and_merged_entries_read_alike(tmp_path: Path) -> None:
    ids = [f"{k:032x}po01" for k in range(6)]
    text = (
        f"defaults: {{project_id: {PROJECT}, region: cn-north-4, target_version: '2.24.03.000'}}\n"
        "proxies:\n"
        f"  - instance_id: {INSTANCE}\n    proxy_id: {ids[0]}\n    name: n\n"
        f"  - {{'instance_id': \"{INSTANCE}\", proxy_id: {ids[1]}, name: n}}\n"
        f"  - {{instance_id: !!str {INSTANCE}, proxy_id: {ids[2]}, name: !!str n}}\n"
        f"  - &base {{instance_id: {INSTANCE}, proxy_id: {ids[3]}, name: n}}\n"
        f"  - <<: *base\n    proxy_id: {ids[4]}\n"
        f"  - {{instance_id: {INSTANCE}, proxy_id: &p {ids[5]}, name: n}}\n"
    )
    entries = list(load_inventory(_write(tmp_path, "spell.yaml", text)).entries())
    assert [(e.project_id, e.instance_id, e.proxy_id, e.name, e.endpoint) for e in entries] == [
        (PROJECT, INSTANCE, i, "n", "https://gaussdb.cn-north-4.myhuaweicloud.com") for i in ids
    ]
    assert [e.line for e in entries] == [3, 6, 7, 8, 9, 11]


@pytest.mark.parametrize(
    "entry",
    [
        "  - instance_id: {i}\n    proxy_id: bad/1\n",  # read from events
        "  - &a\n    instance_id: {i}\n    proxy_id: bad/1\n",  # an anchor: read as a node
        "  - instance_id: {i}\n    proxy_id: bad/1\n    <<: {{name: merged}}\n",  # a merge key
        "  - instance_id: {i}\n    proxy_id: !!str bad/1\n",  # a tag
    ],
    ids=["events", "anchor", "merge", "tag"],
)
def test_errors_read_the_same_whichever_way_the_entry_is_read(tmp_path: Path, entry: str) -> None:
    defaults = f"  project_id: {PROJECT}\n  region: cn-north-4\n  target_version: '2.24.03.000'\n"
    path = _write(tmp_path, "e.yaml", _yaml(entry.format(i=INSTANCE), defaults))
    (err,) = _errors(path)
    assert err.field == "proxies[0].proxy_id"
    assert err.line == 7 + entry.startswith("  - &a")
    assert err.message.startswith("must be 32 letters/digits plus an optional suffix like po01 (got 'bad/1')")


def test_odd_keys_in_an_entry(tmp_path: Path) -> None:
    text = _yaml(
        f"  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {PROXY}, region: cn-north-4, "
        "target_version: '2.24.03.000', no: x}\n"
    )
    (err,) = _errors(_write(tmp_path, "k.yaml", text))
    assert (err.line, err.field, err.message) == (2, "proxies[0].no", "unknown key")
    dup = _yaml(GOOD.replace("region: cn-north-4", "region: cn-north-4, region: cn-north-4"))
    (err,) = _errors(_write(tmp_path, "d.yaml", dup))
    assert (err.field, err.message) == (
        "proxies[0].region",
        "duplicate key (first on line 2); YAML would keep only one",
    )


def test_a_merge_at_the_top_level_is_refused(tmp_path: Path) -> None:
    text = f"base: &b {{window: x}}\n<<: *b\nproxies:\n{GOOD}"
    errors = _errors(_write(tmp_path, "m.yaml", text))
    assert [(e.line, e.field) for e in errors] == [(1, "base"), (2, None)]
    assert "merge keys (<<) are not supported at the top level" in errors[1].message


def test_a_swap_is_reported_beside_other_problems(tmp_path: Path) -> None:
    swapped = "0f46fc46396e4fb19a0cb52f578e9511in01"
    text = _yaml(GOOD.replace(PROXY, swapped).replace("target_version: '2.24.03.000'", "target_version: 'x'"))
    errors = _errors(_write(tmp_path, "s.yaml", text))
    assert sorted(e.field or "" for e in errors) == ["proxies[0].proxy_id", "proxies[0].target_version"]


def test_a_huge_number_of_problems_is_counted_not_listed(tmp_path: Path) -> None:
    n = MAX_LISTED + 500
    proxies = "".join(f"  - {{instance_id: {INSTANCE}, proxy_id: bad{k}}}\n" for k in range(n))
    defaults = f"  project_id: {PROJECT}\n  region: cn-north-4\n  target_version: '2.24.03.000'\n"
    errors = _errors(_write(tmp_path, "many.yaml", _yaml(proxies, defaults)))
    assert len(errors) == MAX_LISTED + 1
    assert all(e.field == f"proxies[{k}].proxy_id" for k, e in enumerate(errors[:-1]))
    assert (errors[-1].line, errors[-1].field) == (None, None)
    assert errors[-1].message.startswith("500 more problem(s) not listed")


# --------------------------------------------------------------------------------- the policy block


@pytest.mark.parametrize(
    ("policy", "line", "field", "fragment"),
    [
        (
            "  replace_defaults: yes\n",
            4,
            "policy.replace_defaults",
            "boolean True; write true/false or quote it",
        ),
        ("  backoff: {initial: 0x10}\n", 4, "policy.backoff.initial", "odd form"),
        ("  backoff: {initial: 1:30}\n", 4, "policy.backoff.initial", "odd form"),
        ("  backoff: {max: .inf}\n", 4, "policy.backoff.max", "odd form"),
        (
            "  rules: [{name: 2024-01-01}]\n",
            4,
            "policy.rules[0].name",
            "tagged 'tag:yaml.org,2002:timestamp'",
        ),
        ("  rules: [&r {x: [*r]}]\n", 4, "policy.rules[0].x[0]", "recursive"),
        ("  rules:\n  rules: []\n", 5, "policy.rules", "duplicate key (first on line 4)"),
    ],
)
def test_the_policy_block_is_read_strictly(
    tmp_path: Path, policy: str, line: int, field: str, fragment: str
) -> None:
    (err,) = _errors(_write(tmp_path, "p.yaml", _yaml(GOOD, extra="policy:\n" + policy)))
    assert (err.line, err.field) == (line, field)
    assert fragment in err.message


def test_the_policy_block_keeps_yaml_12_values(tmp_path: Path) -> None:
    policy = "policy:\n  a: [true, False, 0, -7, +3, 1.5, -1.5, 2., 1.0e-05, null, '0443', '', -.5]\n"
    inv = load_inventory(_write(tmp_path, "p.yaml", _yaml(GOOD, extra=policy)))
    assert inv.policy == {"a": [True, False, 0, -7, 3, 1.5, -1.5, 2.0, 1e-05, None, "0443", "", "-.5"]}


def test_bad_syntax_after_bad_entries_is_reported_alone(tmp_path: Path) -> None:
    # what was read before a syntax error may mean something else: the syntax error is the one message
    text = _yaml(GOOD.replace(PROXY, "bad/1") + GOOD.replace(PROXY, PROXY2) + "  - {unclosed: [\n")
    (err,) = _errors(_write(tmp_path, "s.yaml", text))
    assert err.line is not None and err.line >= 4 and err.message.startswith("not valid YAML")


def test_an_anchored_list_of_proxies_is_read_as_nodes(tmp_path: Path) -> None:
    text = f"proxies: &all\n{GOOD}{GOOD.replace(PROXY, PROXY2)}"
    inv = load_inventory(_write(tmp_path, "a.yaml", text))
    assert [(e.proxy_id, e.line) for e in inv.entries()] == [(PROXY, 2), (PROXY2, 3)]
    (err,) = _errors(_write(tmp_path, "e.yaml", "proxies: &none []\n"))
    assert (err.line, err.field) == (1, "proxies") and "not an empty list" in err.message
