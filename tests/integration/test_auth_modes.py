"""Issue acceptance (real-cloud access): a fleet run in every auth mode, token renewal counted at the
simulator, bad credentials stopping the run at once, and regional endpoint resolution.

The real CLI runs as a subprocess against the real simulator process; the simulator's call log and stats
(its view is the truth) and the job table are what is asserted on.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cloud.auth import IamPassword, Scope
from orchestrator.inventory import InventoryError, load_inventory
from tests.conftest import Result, Sim, cli, db_rows, make_inventory
from tests.simlog import applied_per_proxy

FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]

STATIC_TOKEN = "static-tok-7Qm2Vx9LrT4kPz8Hc3Nw"
AK = "AKSIMTEST00000000001"
SK = "sk-9fJ3kL0pQ7rS2tU5vW8xY1zA4bC6dE"
SECURITY_TOKEN = "sts-Hq2Wm8Kx4Lp9Rt6Yv3Zn7Bc5Df1Gj0"
IAM_USER, IAM_DOMAIN = "ops", "acme"
PASSWORD = "pw-Xr7Kq2Lm9Tz4Vb8Nc3Hs6Jd1Fg5"


# ------------------------------------------------------------------------------------------ helpers
def scenario(n: int, auth: dict[str, Any], *, seed: int = 21, **extra: Any) -> dict[str, Any]:
    """A clean fleet (every proxy upgrades), fast workflows, one proxy per instance."""
    base: dict[str, Any] = {
        "seed": seed,
        "speed": 100,
        "latency_s": 0.01,
        "workflow": {"pending_s": 2, "running_s": 5, "job_visible_after_s": 1},
        "fleet": {"generate": {"proxies": n, "proxies_per_instance": 1}},
        "auth": auth,
    }
    base.update(extra)
    return base


def token_auth(**extra: Any) -> dict[str, Any]:
    return {"mode": "token", "tokens": [STATIC_TOKEN], **extra}


def aksk_auth(security_token: str | None = None) -> dict[str, Any]:
    key: dict[str, Any] = {"ak": AK, "sk": SK}
    if security_token:
        key["security_token"] = security_token
    return {"mode": "aksk", "keys": [key]}


def iam_auth(lifetime_s: float = 86400.0) -> dict[str, Any]:
    return {
        "mode": "token",
        "users": [{"name": IAM_USER, "domain": IAM_DOMAIN, "password": PASSWORD}],
        "token_lifetime_s": lifetime_s,
    }


def iam_env(
    iam_url: str, tmp_path: Path, *, use_file: bool = False, password: str = PASSWORD
) -> dict[str, str]:
    env = {
        "ORCHESTRATOR_IAM_USER": IAM_USER,
        "ORCHESTRATOR_IAM_DOMAIN": IAM_DOMAIN,
        "ORCHESTRATOR_IAM_ENDPOINT": iam_url,
    }
    if use_file:
        pw_file = tmp_path / "iam-password"
        pw_file.write_text(password + "\n", encoding="utf-8")
        pw_file.chmod(0o600)
        env["ORCHESTRATOR_IAM_PASSWORD_FILE"] = str(pw_file)
    else:
        env["ORCHESTRATOR_IAM_PASSWORD"] = password
    return env


def run_fleet(
    sim: Sim, tmp_path: Path, env: dict[str, str], *extra: str, rate: str = "100/s", db: str | None = None
) -> tuple[Result, str]:
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = db or f"sqlite:///{tmp_path / 'jobs.db'}"
    r = cli(
        "run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", rate, "--concurrency", "8",
        *FAST, *extra, env=env, timeout=180,
    )  # fmt: skip
    return r, db


def job_statuses(db: str) -> Counter[str]:
    return Counter(s for (s,) in db_rows(db, "SELECT status FROM jobs"))


def api_calls(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rec for rec in log if rec["route"] not in ("token", "unknown")]


def same_call(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same request (a resend) as the simulator logged it: route, method, path and, for a job poll,
    the workflow id asked about. An upgrade's logged ``workflow_id`` is the one its answer issued (none
    for a refused call), so it is no part of the request's identity."""
    keys = ("route", "method", "path", "workflow_id") if a["route"] == "job" else ("route", "method", "path")
    return all(a[k] == b[k] for k in keys)


def error_lines(r: Result) -> list[str]:
    return [ln for ln in r.err.splitlines() if ln.startswith("error:")]


def assert_every_proxy_upgraded_once(sim: Sim, db: str, n: int) -> None:
    fleet = sim.fleet()
    assert len(fleet) == n
    assert all(p["current_version"] == "2.24.03.000" for p in fleet), fleet
    applied = applied_per_proxy(sim.log())
    assert set(applied) == {p["proxy_id"] for p in fleet}
    assert max(applied.values()) == 1, applied.most_common(3)
    assert job_statuses(db) == Counter({"succeeded": n})


class IamRelay:
    """A pass-through in front of the simulator's ``POST /v3/auth/tokens`` (give its URL as
    ORCHESTRATOR_IAM_ENDPOINT). It records every issued token (the simulator never reveals them) and can
    stretch the ``expires_at`` it reports, so the orchestrator believes a token lives longer than the
    gateway honours it: what a token revoked early at the cloud looks like to a client.

    Faults of its own, by request number (1-based): ``unavailable_every=k`` answers every k-th request
    503 without forwarding it (IAM down for a moment); ``garble={i, ...}`` forwards request i (the
    simulator issues a token) but hands back a 201 whose body is a proxy's HTML page."""

    def __init__(
        self,
        target: str,
        *,
        report_lifetime_s: float | None = None,
        unavailable_every: int | None = None,
        garble: frozenset[int] = frozenset(),
    ) -> None:
        self.target = target.rstrip("/")
        self.report_lifetime_s = report_lifetime_s
        self.tokens: list[str] = []
        self.statuses: list[int] = []
        self.requests = 0
        relay = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, content_type: str, data: bytes, subject: str | None = None) -> None:
                relay.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if subject:
                    self.send_header("X-Subject-Token", subject)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    relay.requests += 1
                    number = relay.requests
                if unavailable_every and number % unavailable_every == 0:
                    error = {"error": {"code": 503, "title": "Service Unavailable", "message": "IAM is busy"}}
                    self.reply(503, "application/json", json.dumps(error).encode())
                    return
                req = urllib.request.Request(
                    relay.target + self.path,
                    data=body,
                    headers={"Content-Type": self.headers.get("Content-Type") or "application/json"},
                    method="POST",
                )
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as exc:
                    status, headers, data = exc.code, exc.headers, exc.read()
                subject = headers.get("X-Subject-Token")
                if subject:
                    relay.tokens.append(subject)
                if status == 201 and relay.report_lifetime_s is not None:
                    parsed = json.loads(data)
                    later = datetime.fromtimestamp(time.time() + relay.report_lifetime_s, UTC)
                    parsed["token"]["expires_at"] = later.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    data = json.dumps(parsed).encode()
                if number in garble:
                    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                    self.reply(201, "text/html", page)
                    return
                self.reply(status, headers.get("Content-Type") or "application/json", data, subject)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> IamRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# ------------------------------------------------------------------------ a fleet in every mode
@pytest.mark.parametrize(
    ("mode", "auth", "env"),
    [
        ("static-token", token_auth(), {"ORCHESTRATOR_AUTH_TOKEN": STATIC_TOKEN}),
        ("aksk", aksk_auth(), {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}),
        (
            "aksk-temporary",
            aksk_auth(SECURITY_TOKEN),
            {
                "HUAWEICLOUD_SDK_AK": AK,
                "HUAWEICLOUD_SDK_SK": SK,
                "HUAWEICLOUD_SDK_SECURITY_TOKEN": SECURITY_TOKEN,
            },
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_fleet_runs_with_static_credentials(
    mode: str, auth: dict[str, Any], env: dict[str, str], sim_factory, tmp_path: Path
) -> None:
    n = 12
    sim = sim_factory(scenario(n, auth))
    r, db = run_fleet(sim, tmp_path, env)
    assert r.code == 0, str(r)
    assert_every_proxy_upgraded_once(sim, db, n)
    stats = sim.stats()
    assert stats["auth_failures"] == 0, stats
    assert stats["token_issues"] == 0 and stats["calls"].get("token", 0) == 0, stats
    assert {rec["http_status"] for rec in api_calls(sim.log())} == {200}


# the password from the environment is exercised by the bad-password cases below
@pytest.mark.parametrize("use_file", [True], ids=["password-file"])
def test_iam_tokens_renewed_once_per_expiry_not_per_worker(
    use_file: bool, sim_factory, tmp_path: Path
) -> None:
    """Token lifetime (3 s) much shorter than the run: at 20 calls/s, 30 proxies x >= 4 calls take >= 6 s
    whatever the machine's speed. Every renewal is one exchange (8 workers share it), none overlap, and
    no call is ever refused: the token is replaced before the gateway would expire it."""
    n, lifetime = 30, 3.0
    sim = sim_factory(scenario(n, iam_auth(lifetime)))
    r, db = run_fleet(sim, tmp_path, iam_env(sim.url, tmp_path, use_file=use_file), rate="20/s")
    assert r.code == 0, str(r)
    assert_every_proxy_upgraded_once(sim, db, n)

    log = sim.log()
    stats = sim.stats()
    assert stats["auth_failures"] == 0, stats
    assert all(rec["http_status"] == 200 for rec in api_calls(log)), [
        (rec["route"], rec["http_status"], rec.get("auth"))
        for rec in api_calls(log)
        if rec["http_status"] != 200
    ]
    tokens = [rec for rec in log if rec["route"] == "token"]
    assert all(rec["http_status"] == 201 for rec in tokens)
    assert len(tokens) == stats["token_issues"]
    # the run outlived several lifetimes, so the token must have been renewed: at least once per expiry
    span = max(rec["received_at"] for rec in api_calls(log)) - tokens[0]["received_at"]
    assert span > 2 * lifetime, span
    assert stats["token_issues"] >= int(span // lifetime) + 1, (stats["token_issues"], span)
    # ... and not once per worker: at most one exchange per renewal point (half the lifetime), plus slack
    assert stats["token_issues"] <= span / (lifetime / 2) + 2, (stats["token_issues"], span)
    # single flight: no two exchanges in flight at once
    spans = sorted((rec["received_at"], rec["answered_at"]) for rec in tokens)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, spans


def test_token_refused_early_is_renewed_once_and_the_call_resent(sim_factory, tmp_path: Path) -> None:
    """The gateway drops tokens after 2 s while IAM's answer (through the relay) says an hour: every
    refusal is a 401 the client must answer with one renewal (shared by all workers) and one resend.
    Nothing is upgraded twice and no job fails."""
    n, lifetime = 30, 2.0
    sim = sim_factory(scenario(n, iam_auth(lifetime)))
    with IamRelay(sim.url, report_lifetime_s=3600) as relay:
        r, db = run_fleet(sim, tmp_path, iam_env(relay.url, tmp_path), rate="20/s")
    assert r.code == 0, str(r)
    assert_every_proxy_upgraded_once(sim, db, n)

    log = sim.log()
    refused = [rec for rec in api_calls(log) if rec["http_status"] == 401]
    assert {rec.get("auth") for rec in refused} <= {"expired_token"}, refused[:3]
    issues = sim.stats()["token_issues"]
    span = max(rec["received_at"] for rec in api_calls(log)) - min(rec["received_at"] for rec in log)
    assert span > 2 * lifetime, span
    assert refused, "the run outlived the gateway's token lifetime, so some call must have been refused"
    assert issues >= 2
    # one renewal per expiry (a token is good for `lifetime` at the gateway), not one per refused call
    assert issues <= span / lifetime + 2, (issues, span, len(refused))
    assert len(refused) <= 8 * issues, (len(refused), issues)  # at most one refusal per worker per renewal
    # each refused call was resent, and the resend went through
    seqs = sorted(api_calls(log), key=lambda rec: rec["seq"])
    for rec in refused:
        later = [
            x for x in seqs
            if x["seq"] > rec["seq"] and same_call(x, rec)
        ]  # fmt: skip
        assert later and later[0]["http_status"] != 401, rec
    reasons = [reason or "" for (reason,) in db_rows(db, "SELECT reason FROM jobs")]
    assert not [x for x in reasons if "401" in x or "credential" in x.lower()], reasons


def test_iam_briefly_unavailable_or_garbled_at_renewal_does_not_stop_the_run(
    sim_factory, tmp_path: Path
) -> None:
    """IAM answering 503 now and then, and once a 201 whose body is a proxy's HTML page (the credentials
    were accepted; the answer was lost on the way): neither says the credentials are wrong, so neither
    may stop the run as if they were. The renewal is retried and every proxy is upgraded."""
    n, lifetime = 20, 3.0
    sim = sim_factory(scenario(n, iam_auth(lifetime)))
    with IamRelay(sim.url, unavailable_every=4, garble=frozenset({2})) as relay:
        r, db = run_fleet(sim, tmp_path, iam_env(relay.url, tmp_path), rate="20/s")
    assert r.code == 0, str(r)
    assert relay.requests >= 4, relay.statuses  # the garbled renewal and an unavailable IAM were both met
    assert_every_proxy_upgraded_once(sim, db, n)


# ------------------------------------------------------------------ precedence of credential sources
def test_complete_higher_source_wins(sim_factory, tmp_path: Path) -> None:
    # AK/SK beats IAM and a static token: the simulator accepts only signatures; IAM is never asked.
    sim = sim_factory(scenario(3, aksk_auth()), name="aksk")
    env = {
        "HUAWEICLOUD_SDK_AK": AK,
        "HUAWEICLOUD_SDK_SK": SK,
        **iam_env(sim.url, tmp_path),
        "ORCHESTRATOR_AUTH_TOKEN": STATIC_TOKEN,
    }
    (tmp_path / "a").mkdir()
    r, _ = run_fleet(sim, tmp_path / "a", env)
    assert r.code == 0, str(r)
    assert sim.stats()["calls"].get("token", 0) == 0
    assert sim.stats()["auth_failures"] == 0

    # IAM beats a static token: the simulator knows no static token; every call carries an IAM token.
    sim2 = sim_factory(scenario(3, iam_auth()), name="iam")
    (tmp_path / "b").mkdir()
    env2 = {**iam_env(sim2.url, tmp_path), "ORCHESTRATOR_AUTH_TOKEN": STATIC_TOKEN}
    r2, _ = run_fleet(sim2, tmp_path / "b", env2)
    assert r2.code == 0, str(r2)
    assert sim2.stats()["token_issues"] == 1
    assert sim2.stats()["auth_failures"] == 0


# ------------------------------------------------------------------------- bad credentials stop
BAD_CASES: list[tuple[str, dict[str, Any], dict[str, str], str, str]] = [
    # id, scenario auth, env, the secret that must not be echoed, a fragment of the cause in the message
    ("aksk-wrong-sk", aksk_auth(), {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": "sk-WRONG-4hT9xQ2mZ7"},
     "sk-WRONG-4hT9xQ2mZ7", "signature"),
    ("aksk-unknown-ak", aksk_auth(), {"HUAWEICLOUD_SDK_AK": "AKUNKNOWN0000000000", "HUAWEICLOUD_SDK_SK": SK},
     SK, "access key"),
    ("aksk-wrong-security-token", aksk_auth(SECURITY_TOKEN),
     {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK,
      "HUAWEICLOUD_SDK_SECURITY_TOKEN": "sts-WRONG-8kLp3Vx"},
     "sts-WRONG-8kLp3Vx", "security token"),
    ("static-token-wrong", token_auth(), {"ORCHESTRATOR_AUTH_TOKEN": "tok-WRONG-Zq8Lm4Rt2"},
     "tok-WRONG-Zq8Lm4Rt2", "token"),
]  # fmt: skip


def assert_stopped_cleanly(r: Result, db: str, secret: str, fragment: str) -> None:
    assert r.code == 2, str(r)
    errors = error_lines(r)
    assert len(errors) == 1, str(r)  # one clear message ...
    assert "credential" in errors[0].lower() or "refused" in errors[0].lower(), errors
    assert fragment.lower() in errors[0].lower(), errors  # ... that says why
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert secret not in r.out and secret not in r.err
    # nothing sent for any job, every job still resendable, the run marked stopped with the reason
    assert job_statuses(db).keys() == {"pending"}, job_statuses(db)
    assert db_rows(db, "SELECT count(*) FROM attempts")[0][0] == 0
    ((status, reason),) = db_rows(db, "SELECT status, stop_reason FROM runs")
    assert status == "stopped" and reason, (status, reason)


@pytest.mark.parametrize(
    ("case", "auth", "env", "secret", "fragment"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_bad_key_or_token_stops_the_run_at_once(
    case: str,
    auth: dict[str, Any],
    env: dict[str, str],
    secret: str,
    fragment: str,
    sim_factory,
    tmp_path: Path,
) -> None:
    sim = sim_factory(scenario(20, auth))
    r, db = run_fleet(sim, tmp_path, env)
    assert_stopped_cleanly(r, db, secret, fragment)
    log = sim.log()
    # at most a handful of calls, every one refused at the gateway; never more than the five bad
    # signatures that lock a key; no upgrade call at all
    assert 1 <= len(log) <= 5, [(rec["route"], rec["http_status"], rec.get("auth")) for rec in log]
    assert all(rec["http_status"] == 401 for rec in log), log
    assert not [rec for rec in log if rec["route"] == "upgrade"]
    assert sim.stats()["auth_failures"] == len(log)
    assert not [rec for rec in log if rec.get("auth") == "locked_ak"]


def test_after_a_wrong_sk_the_corrected_resume_finishes(sim_factory, tmp_path: Path) -> None:
    """Two tries with a wrong SK spend two of the five bad signatures the gateway tolerates, so the key
    is not locked and the operator's resume with the right SK upgrades everything."""
    n = 6
    sim = sim_factory(scenario(n, aksk_auth()))
    wrong = {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": "sk-WRONG-4hT9xQ2mZ7"}
    r, db = run_fleet(sim, tmp_path, wrong)
    assert r.code == 2, str(r)
    again = cli("resume", "--db", db, *FAST, env=wrong, timeout=120)
    assert again.code == 2, str(again)
    assert len(error_lines(again)) == 1, str(again)
    fixed = cli(
        "resume", "--db", db, *FAST, env={"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}, timeout=180
    )
    assert fixed.code == 0, str(fixed)
    assert_every_proxy_upgraded_once(sim, db, n)
    refused = [rec.get("auth") for rec in sim.log() if rec["http_status"] == 401]
    assert refused == ["bad_signature", "bad_signature"], refused


@pytest.mark.parametrize(
    ("case", "user", "password", "use_file"),
    [
        ("wrong-password", IAM_USER, "pw-WRONG-Yt5Qv8Lx1", False),
        ("wrong-password-file", IAM_USER, "pw-WRONG-Yt5Qv8Lx1", True),
        ("unknown-user", "nobody", PASSWORD, False),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith(("wrong", "unknown")) else "",
)
def test_bad_iam_password_stops_the_run_at_once(
    case: str, user: str, password: str, use_file: bool, sim_factory, tmp_path: Path
) -> None:
    sim = sim_factory(scenario(20, iam_auth()))
    env = {**iam_env(sim.url, tmp_path, use_file=use_file, password=password), "ORCHESTRATOR_IAM_USER": user}
    r, db = run_fleet(sim, tmp_path, env)
    assert_stopped_cleanly(r, db, password, "IAM refused")
    assert user in error_lines(r)[0]  # the user is an identifier: naming it helps the operator
    log = sim.log()
    assert 1 <= len(log) <= 5, [(rec["route"], rec["http_status"]) for rec in log]
    assert all(rec["route"] == "token" and rec["http_status"] == 401 for rec in log), log
    assert sim.stats()["token_issues"] == 0


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"HUAWEICLOUD_SDK_AK": AK}, ["HUAWEICLOUD_SDK_SK"]),
        ({"HUAWEICLOUD_SDK_SK": SK}, ["HUAWEICLOUD_SDK_AK"]),
        ({"HUAWEICLOUD_SDK_SECURITY_TOKEN": SECURITY_TOKEN}, ["HUAWEICLOUD_SDK_SECURITY_TOKEN"]),
        (
            {"ORCHESTRATOR_IAM_USER": IAM_USER, "ORCHESTRATOR_IAM_PASSWORD": PASSWORD},
            ["ORCHESTRATOR_IAM_DOMAIN"],
        ),
        (
            {
                "ORCHESTRATOR_IAM_USER": IAM_USER,
                "ORCHESTRATOR_IAM_DOMAIN": IAM_DOMAIN,
                "ORCHESTRATOR_IAM_PASSWORD": PASSWORD,
                "ORCHESTRATOR_IAM_PASSWORD_FILE": "/nonexistent/pw",
            },
            ["ORCHESTRATOR_IAM_PASSWORD", "ORCHESTRATOR_IAM_PASSWORD_FILE"],
        ),
    ],
    ids=["ak-only", "sk-only", "security-token-only", "iam-no-domain", "iam-password-twice"],
)
def test_half_configured_credentials_are_refused_before_any_call(
    env: dict[str, str], names: list[str], sim_factory, tmp_path: Path
) -> None:
    sim = sim_factory(scenario(3, {"mode": "any", "tokens": [STATIC_TOKEN]}))
    r, _ = run_fleet(sim, tmp_path, {**env, "ORCHESTRATOR_AUTH_TOKEN": STATIC_TOKEN})
    assert r.code == 2, str(r)
    errors = error_lines(r)
    assert len(errors) == 1, str(r)
    assert all(name in errors[0] for name in names), errors
    for value in (SK, SECURITY_TOKEN, PASSWORD, STATIC_TOKEN):
        assert value not in r.out and value not in r.err
    assert sim.stats()["total_calls"] == 0  # no silent fall-through to the static token


# ------------------------------------------------------------------------- regional endpoints
PROJECT = "054e292c9880d4992f02c0196d3ea468"
INSTANCE = "517ea793ab91438cbfcd9c4b1c958b1ein07"


def proxy_id(i: int) -> str:
    return f"{i:032x}po01"


def test_region_resolves_to_its_endpoint_and_an_explicit_endpoint_wins(tmp_path: Path) -> None:
    inv = tmp_path / "regions.yaml"
    inv.write_text(
        f"""
defaults:
  project_id: {PROJECT}
  target_version: "2.24.03.000"
proxies:
  - {{instance_id: {INSTANCE}, proxy_id: {proxy_id(1)}, region: cn-north-4}}
  - {{instance_id: {INSTANCE}, proxy_id: {proxy_id(2)}, region: me-east-1}}
  - {{instance_id: {INSTANCE}, proxy_id: {proxy_id(3)}, region: af-south-1}}
  - {{instance_id: {INSTANCE}, proxy_id: {proxy_id(4)}, region: cn-north-4,
      endpoint: "https://GaussDB.Private.Example.COM:443/"}}
  - {{instance_id: {INSTANCE}, proxy_id: {proxy_id(5)}, region: xx-nowhere-9,
      endpoint: "https://gaussdb.private.example.com:8443"}}
""",
        encoding="utf-8",
    )
    got = {e.proxy_id: (e.region, e.endpoint) for e in load_inventory(inv).entries()}
    assert got == {
        proxy_id(1): ("cn-north-4", "https://gaussdb.cn-north-4.myhuaweicloud.com"),
        proxy_id(2): ("me-east-1", "https://gaussdbformysql.me-east-1.myhuaweicloud.com"),
        proxy_id(3): ("af-south-1", "https://gaussdb-mysql.af-south-1.myhuaweicloud.com"),
        proxy_id(4): ("cn-north-4", "https://gaussdb.private.example.com"),  # explicit wins, normalised
        proxy_id(5): ("xx-nowhere-9", "https://gaussdb.private.example.com:8443"),
    }
    # --endpoint (the run's override) wins over both
    override = load_inventory(inv, endpoint_override="http://127.0.0.1:8443")
    assert {e.endpoint for e in override.entries()} == {"http://127.0.0.1:8443"}

    # the same through a CSV inventory and a region given in defaults
    csv_inv = tmp_path / "regions.csv"
    csv_inv.write_text(
        "project_id,instance_id,proxy_id,region,endpoint,target_version\n"
        f"{PROJECT},{INSTANCE},{proxy_id(6)},me-east-1,,2.24.03.000\n"
        f"{PROJECT},{INSTANCE},{proxy_id(7)},af-south-1,https://x.example.com,2.24.03.000\n",
        encoding="utf-8",
    )
    got_csv = {e.proxy_id: e.endpoint for e in load_inventory(csv_inv).entries()}
    assert got_csv == {
        proxy_id(6): "https://gaussdbformysql.me-east-1.myhuaweicloud.com",
        proxy_id(7): "https://x.example.com",
    }
    defaults_inv = tmp_path / "defaults.yaml"
    defaults_inv.write_text(
        f"defaults: {{project_id: {PROJECT}, region: af-south-1, target_version: '2.24.03.000'}}\n"
        f"proxies:\n  - {{instance_id: {INSTANCE}, proxy_id: {proxy_id(8)}}}\n",
        encoding="utf-8",
    )
    (entry,) = load_inventory(defaults_inv).entries()
    assert entry.endpoint == "https://gaussdb-mysql.af-south-1.myhuaweicloud.com"


def test_unknown_region_without_endpoint_is_refused(tmp_path: Path) -> None:
    inv = tmp_path / "bad.yaml"
    inv.write_text(
        f"proxies:\n  - {{project_id: {PROJECT}, instance_id: {INSTANCE}, proxy_id: {proxy_id(1)},"
        " region: cn-nort-4, target_version: '2.24.03.000'}\n",
        encoding="utf-8",
    )
    with pytest.raises(InventoryError) as info:
        load_inventory(inv)
    text = str(info.value)
    assert "cn-nort-4" in text and "cn-north-4" in text  # names it and suggests the near miss


def test_iam_host_follows_the_region_unless_overridden() -> None:
    scope = Scope(project_id=PROJECT, region="me-east-1", endpoint="https://gaussdbformysql.me-east-1.x")
    assert IamPassword("u", "d", "p").iam_base_url(scope) == "https://iam.me-east-1.myhuaweicloud.com"
    assert IamPassword("u", "d", "p", iam_endpoint="http://127.0.0.1:9/").iam_base_url(scope) == (
        "http://127.0.0.1:9"
    )
