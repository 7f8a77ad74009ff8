"""Issue acceptance (secrets kept secret): full runs with known secret values, at --log-level debug (and
with --log-format json), then every output is searched for them: stdout and stderr of every command
(run, status, report table/csv/json, flagged, plan, resume), the job table's rows, and on SQLite the
database file bytes, including the WAL file as it is while the run writes it.

The secrets: the static token, the SK and the security token, the IAM password, and the tokens IAM issued
during the run (read off the wire by a relay in front of the simulator's IAM route, since the simulator
never reveals them). Secrets of the credential sources that lose the precedence are set as well: they
must not leak either. A leak is any 10-character piece of a secret, so a value cut by a table's line
wrapping or shortened with "..." is still found.

The runs are deliberately messy (rejections, failed workflows, 5xx/429/409, lost and garbled answers,
an unreachable IAM now and then, tokens expiring mid-run) so that the error paths, where a secret is most
likely to be echoed, are all taken.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PY, Sim, clean_env, cli, db_rows, make_inventory
from tests.integration.test_auth_modes import FAST, IAM_DOMAIN, IAM_USER, IamRelay

WINDOW = 10


def _secret(prefix: str) -> str:
    # letters and digits: a 10-character piece cannot turn up by chance among the many hex ids around
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))


@dataclass
class Secrets:
    token: str = field(default_factory=lambda: _secret("tok"))
    ak: str = field(default_factory=lambda: "AK" + secrets.token_hex(9).upper())  # an identifier
    sk: str = field(default_factory=lambda: _secret("sk"))
    security_token: str = field(default_factory=lambda: _secret("sts"))
    password: str = field(default_factory=lambda: _secret("pw"))
    issued: list[str] = field(default_factory=list)  # IAM tokens seen on the wire

    def values(self) -> dict[str, str]:
        found = {
            "static token": self.token,
            "SK": self.sk,
            "security token": self.security_token,
            "IAM password": self.password,
        }
        found.update({f"IAM-issued token #{i + 1}": t for i, t in enumerate(self.issued)})
        return found


def pieces(value: str) -> set[str]:
    return {value[i : i + WINDOW] for i in range(len(value) - WINDOW + 1)}


def leaks(where: str, data: str | bytes, s: Secrets) -> list[str]:
    blob = data if isinstance(data, bytes) else data.encode("utf-8", "replace")
    found = []
    for name, value in s.values().items():
        hit = next((p for p in sorted(pieces(value)) if p.encode() in blob), None)
        if hit is not None:
            at = blob.find(hit.encode())
            context = blob[max(0, at - 60) : at + 60].decode("utf-8", "replace")
            found.append(f"{where}: {name} (piece {hit!r}) in ...{context!r}...")
    return found


def messy_scenario(n: int, auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": 5,
        "speed": 100,
        "latency_s": 0.01,
        "workflow": {"pending_s": 2, "running_s": 5, "job_visible_after_s": 1, "fail_rate": 0.1},
        "fleet": {"generate": {"proxies": n, "proxies_per_instance": 1, "reject_rate": 0.15}},
        "faults": {
            "http_500": 0.04,
            "http_503": 0.04,
            "http_429": 0.03,
            "busy_409": 0.03,
            "reset_after": 0.03,
            "malformed_after": 0.03,
            "routes": ["upgrade", "proxy_version", "job", "immediate_jobs"],  # IAM's: see the relay
            "retry_after_s": 0,
        },
        "auth": auth,
    }


FAST_POLICY = {"policy": {"backoff": {"initial": 0.1, "max": 0.5, "multiplier": 2.0, "max_attempts": 8}}}


def auth_for(mode: str, s: Secrets) -> dict[str, Any]:
    if mode == "token":
        return {"mode": "token", "tokens": [s.token]}
    if mode == "aksk":
        return {"mode": "aksk", "keys": [{"ak": s.ak, "sk": s.sk, "security_token": s.security_token}]}
    return {
        "mode": "token",
        "users": [{"name": IAM_USER, "domain": IAM_DOMAIN, "password": s.password}],
        "token_lifetime_s": 3,
    }


def env_for(mode: str, s: Secrets, iam_url: str) -> dict[str, str]:
    """The winning source complete, and the sources it beats set as well."""
    static = {"ORCHESTRATOR_AUTH_TOKEN": s.token}
    iam = {
        "ORCHESTRATOR_IAM_USER": IAM_USER,
        "ORCHESTRATOR_IAM_DOMAIN": IAM_DOMAIN,
        "ORCHESTRATOR_IAM_PASSWORD": s.password,
        "ORCHESTRATOR_IAM_ENDPOINT": iam_url,
    }
    aksk = {
        "HUAWEICLOUD_SDK_AK": s.ak,
        "HUAWEICLOUD_SDK_SK": s.sk,
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": s.security_token,
    }
    if mode == "token":
        return static
    if mode == "iam":
        return {**iam, **static}
    return {**aksk, **iam, **static}


@dataclass
class Outputs:
    """What was searched, and what was found. Files read while a command runs are searched at once
    (IAM tokens are known as soon as they are issued: ``Secrets.issued`` is the relay's live list)."""

    secrets: Secrets
    texts: dict[str, str] = field(default_factory=dict)
    found: list[str] = field(default_factory=list)
    files_seen: set[str] = field(default_factory=set)
    snapshots: int = 0
    _searched: set[tuple[bytes, int]] = field(default_factory=set)

    def search(self, where: str, data: str | bytes) -> None:
        key = hashlib.sha256(data if isinstance(data, bytes) else data.encode()).digest()
        if (key, len(self.secrets.issued)) in self._searched:
            return  # the same bytes were already searched for the same secrets
        self._searched.add((key, len(self.secrets.issued)))
        self.found += leaks(where, data, self.secrets)

    def search_texts(self) -> None:
        for where, text in self.texts.items():
            self.search(where, text)


def run_watching_files(
    args: list[str], env: dict[str, str], tmp: Path, name: str, watch: Path | None, out: Outputs
) -> int:
    """The CLI with stdout and stderr kept apart; while it runs, every file next to ``watch`` whose name
    starts with it (the SQLite file, its -wal, -shm or -journal) is read over and over, so a secret that
    only passes through the WAL is caught too."""
    so, se = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
    with so.open("wb") as fo, se.open("wb") as fe:
        proc = subprocess.Popen(
            [PY, "-m", "orchestrator", *args],
            env=clean_env(env),
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        snapshot = 0
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"{name} did not finish: {se.read_text()[-2000:]}")
            if watch is not None:
                for f in watch.parent.glob(watch.name + "*"):
                    try:
                        data = f.read_bytes()
                    except OSError:
                        continue
                    out.files_seen.add(f.name)
                    out.search(f"{f.name} while {name} ran (snapshot {snapshot})", data)
                snapshot += 1
                out.snapshots += 1
            time.sleep(0.05)
    out.texts[f"{name} stdout"] = so.read_text(encoding="utf-8", errors="replace")
    out.texts[f"{name} stderr"] = se.read_text(encoding="utf-8", errors="replace")
    return int(proc.returncode)


def dump_tables(db: str) -> str:
    if db.startswith("sqlite"):
        names = [n for (n,) in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    else:
        names = [
            n
            for (n,) in db_rows(
                db, "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            )
        ]
    assert {"runs", "jobs", "attempts", "workflows"} <= set(names), names
    return "\n".join(f"{n}: {db_rows(db, f'SELECT * FROM {n}')!r}" for n in names)


def full_run_outputs(
    sim: Sim,
    tmp: Path,
    s: Secrets,
    mode: str,
    log_args: list[str],
    db: str,
    iam_url: str,
    *,
    all_commands: bool = True,
) -> tuple[Outputs, int]:
    """The run, then report (table, csv, json), flagged and plan; with ``all_commands`` also status,
    status of all runs and resume (of the finished run)."""
    inv = make_inventory(sim, tmp / "fleet.yaml")
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(FAST_POLICY), encoding="utf-8")
    env = env_for(mode, s, iam_url)
    sqlite_file = Path(db.removeprefix("sqlite:///")) if db.startswith("sqlite") else None
    out = Outputs(s)
    code = run_watching_files(
        [*log_args, "run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "100/s",
         "--concurrency", "8", "--policy", str(policy), *FAST],
        env, tmp, "run", sqlite_file, out,
    )  # fmt: skip
    for fmt in ("table", "csv", "json"):
        run_watching_files(
            [*log_args, "report", "1", "--db", db, "--format", fmt], env, tmp, f"report-{fmt}", None, out
        )
    commands = {
        "flagged": ["flagged", "1", "--db", db],
        "plan": ["plan", str(inv), "--endpoint", sim.url, "--format", "json", "--rate", "100/s"],
    }
    if all_commands:
        commands |= {
            "status": ["status", "1", "--db", db],
            "status-all": ["status", "--db", db],
            "resume": ["resume", "1", "--db", db, "--endpoint", sim.url, *FAST],
        }
    for name, args in commands.items():
        run_watching_files([*log_args, *args], env, tmp, name, sqlite_file, out)
    out.texts["job table rows"] = dump_tables(db)
    if sqlite_file is not None:
        for f in sqlite_file.parent.glob(sqlite_file.name + "*"):
            out.files_seen.add(f.name)
            out.search(f"{f.name} at the end", f.read_bytes())
    return out, code


def assert_no_leaks(out: Outputs) -> None:
    out.search_texts()
    assert not out.found, "\n".join(out.found[:20])


LOGS = {"debug": ["--log-level", "debug"], "debug-json": ["--log-level", "debug", "--log-format", "json"]}


# every mode once and both log formats, not the full product: each case is a full messy run
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "log"), [("token", "debug-json"), ("aksk", "debug"), ("iam", "debug"), ("iam", "debug-json")]
)
def test_no_secret_in_any_output_or_in_the_sqlite_file(
    mode: str, log: str, sim_factory, tmp_path: Path
) -> None:
    s = Secrets()
    sim = sim_factory(messy_scenario(24, auth_for(mode, s)))
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    with IamRelay(sim.url, unavailable_every=3) as relay:
        s.issued = relay.tokens
        # the json variant skips the commands whose output the debug variant already covers
        out, code = full_run_outputs(
            sim, tmp_path, s, mode, LOGS[log], db, relay.url, all_commands=log == "debug"
        )
    assert code == 1, out.texts["run stderr"][-3000:]  # finished, with flagged/failed jobs
    # the run was as messy as intended, and it did log at debug level
    stats = sim.stats()
    assert stats["faults"], stats
    assert sum(stats["calls"].values()) > 60, stats
    assert "debug" in out.texts["run stderr"], out.texts["run stderr"][-2000:]
    if log == "debug-json":
        lines = out.texts["run stderr"].splitlines()
        assert sum(ln.startswith('{"') for ln in lines) > len(lines) / 2, lines[:5]
    if mode == "iam":
        assert len(s.issued) >= 2, "tokens expire every 3 s: the run should have seen a renewal"
    assert "jobs.db-wal" in out.files_seen and out.snapshots > 10, (out.files_seen, out.snapshots)
    # the search finds what it looks for (a self-check on the search itself)
    assert leaks("self-check", f"xx{s.sk[3:20]}yy", s)
    assert_no_leaks(out)


@pytest.mark.slow
def test_no_secret_in_the_postgresql_tables(pg_url: str, sim_factory, tmp_path: Path) -> None:
    s = Secrets()
    sim = sim_factory(messy_scenario(24, auth_for("iam", s)))
    with IamRelay(sim.url, unavailable_every=3) as relay:
        s.issued = relay.tokens
        out, code = full_run_outputs(sim, tmp_path, s, "iam", LOGS["debug"], pg_url, relay.url)
    assert code == 1, out.texts["run stderr"][-3000:]
    assert s.issued
    assert "jobs: [(" in out.texts["job table rows"]
    assert_no_leaks(out)


BAD = {
    "token": lambda s, iam: {"ORCHESTRATOR_AUTH_TOKEN": _secret("tokwrong")},
    "aksk": lambda s, iam: {
        "HUAWEICLOUD_SDK_AK": s.ak,
        "HUAWEICLOUD_SDK_SK": _secret("skwrong"),
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": s.security_token,
    },
    "iam": lambda s, iam: {
        "ORCHESTRATOR_IAM_USER": IAM_USER,
        "ORCHESTRATOR_IAM_DOMAIN": IAM_DOMAIN,
        "ORCHESTRATOR_IAM_PASSWORD": _secret("pwwrong"),
        "ORCHESTRATOR_IAM_ENDPOINT": iam,
    },
}


@pytest.mark.parametrize("mode", list(BAD))
def test_refused_credentials_are_not_echoed(mode: str, sim_factory, tmp_path: Path) -> None:
    """A wrong SK/token/password is as secret as a right one: the refusal names the cause, not the value."""
    s = Secrets()
    sim = sim_factory(messy_scenario(6, auth_for(mode, s)) | {"faults": {}})
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    env = BAD[mode](s, sim.url)
    wrong = next(v for k, v in env.items() if k.endswith(("_SK", "_TOKEN", "_PASSWORD")) and "wrong" in v)
    s.token = wrong if mode == "token" else s.token
    s.sk = wrong if mode == "aksk" else s.sk
    s.password = wrong if mode == "iam" else s.password
    out = Outputs(s)
    for log, args in LOGS.items():
        db = f"sqlite:///{tmp_path / f'{log}.db'}"
        r = cli(*args, "run", str(inv), "--db", db, "--endpoint", sim.url, *FAST, env=env, timeout=120)
        assert r.code == 2, str(r)
        out.texts[f"{log} stdout"], out.texts[f"{log} stderr"] = r.out, r.err
        out.texts[f"{log} rows"] = dump_tables(db)
        out.search(f"{log} db", (tmp_path / f"{log}.db").read_bytes())
    assert_no_leaks(out)


def test_the_simulator_keeps_secrets_too(sim_factory, tmp_path: Path) -> None:
    """The simulator's own call log (file and /_sim/log), stats and console never show a credential."""
    s = Secrets()
    sim = sim_factory(messy_scenario(6, auth_for("iam", s)) | {"faults": {}})
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    with IamRelay(sim.url) as relay:
        s.issued = relay.tokens
        r = cli("run", str(inv), "--db", str(tmp_path / "j.db"), "--endpoint", sim.url, *FAST,
                env=env_for("iam", s, relay.url), timeout=120)  # fmt: skip
    assert r.code in (0, 1), str(r)
    assert s.issued
    out = Outputs(s, texts={"/_sim/log": repr(sim.log()), "/_sim/stats": repr(sim.stats())})
    sim.stop()
    out.search("call log file", sim.log_file.read_bytes())
    out.search("simulator console", sim.stdout.read_bytes())
    assert_no_leaks(out)
