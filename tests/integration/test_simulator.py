"""The simulator on a real loopback socket, driven with aiohttp like the orchestrator drives the cloud."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.cloud.signer import sign_request
from orchestrator.simulator import Scenario, SimulatorServer, serve

PROJECT = "054e292c9880d4992f02c0196d3ea468"
INST, INST2 = "517ea793ab91438cbfcd9c4b1c958b1ein07", "627ea793ab91438cbfcd9c4b1c958b1ein07"
P1, P2, P3 = (f"{c * 32}po01" for c in "abc")
OLD, NEW = "2.23.12.000", "2.24.03.000"
BODY = {"source_version": OLD, "target_version": NEW}
FAST = {"pending_s": 0.05, "running_s": 0.3, "job_visible_after_s": 0.05}


def scenario(**extra: Any) -> Scenario:
    data: dict[str, Any] = {
        "seed": 5,
        "project_id": PROJECT,
        "workflow": FAST,
        "fleet": {
            "instances": [
                {
                    "id": INST,
                    "name": "alpha",
                    "proxies": [
                        {"id": P1},
                        {
                            "id": P2,
                            "nodes": 2,
                            "reject": "Upgrade failed due to insufficient subnet ip",
                            "reject_nodes": [1],
                        },
                    ],
                },
                {"id": INST2, "name": "beta", "proxies": [{"id": P3}]},
            ]
        },
    }
    data.update(extra)
    return Scenario.from_dict(data)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def upgrade_url(sim: SimulatorServer, instance: str = INST, proxy: str = P1) -> str:
    return f"{sim.url}/v3/{PROJECT}/instances/{instance}/proxy/{proxy}/upgrade-version"


async def get_json(http: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any]:
    async with http.get(url, params=params) as resp:
        assert resp.headers["X-Request-Id"]
        return resp.status, await resp.json()


async def wait_for(predicate: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_every_read_route_and_the_upgrade_lifecycle(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario()) as sim:
        base = f"{sim.url}/v3/{PROJECT}"
        status, body = await get_json(http, f"{base}/instances", limit="100")
        assert status == 200 and body["total_count"] == 2 and body["instances"][0]["name"] == "alpha"
        status, body = await get_json(http, f"{base}/instances/{INST}/proxies", offset="0", limit="100")
        assert [p["proxy"]["pool_id"] for p in body["proxy_list"]] == [P1, P2]
        status, body = await get_json(http, f"{base}/instances/{INST}/proxies", limit="101")
        assert (status, body["error_code"]) == (400, "DBS.200001")
        version_url = f"{base}/instances/{INST}/proxy/{P1}/taurusproxy/proxy-version"
        status, body = await get_json(http, version_url)
        assert (status, body["current_version"], body["latest_version"], body["can_upgrade"]) == (
            200,
            OLD,
            NEW,
            True,
        )
        assert set(body["risk"]) == {
            "level",
            "suggest",
            "influence",
            "guidance",
            "service_impact_duration",
            "upgrade_duration",
        }

        async with http.post(upgrade_url(sim), json=BODY) as resp:
            assert resp.status == 200 and resp.headers["X-Request-Id"]
            (item,) = (await resp.json())["update_result"]
        assert item["state"] == "ACCEPT" and item["error_message"] is None and item["instance_id"] == INST
        wid = item["workflow_id"]
        status, body = await get_json(http, f"{base}/jobs", id=wid)
        assert (status, body["error_code"]) == (400, "DBS.200543")  # not queryable yet
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            assert (resp.status, (await resp.json())["error_code"]) == (409, "DBS.200019")
        await asyncio.sleep(0.06)
        status, body = await get_json(http, f"{base}/jobs", id=wid)
        assert status == 200 and body["job"]["status"] in ("Pending", "Running")
        assert body["job"]["instance"] == {"id": INST, "name": "alpha"}
        seen = {body["job"]["status"]}
        while True:
            # the version is read before the status: a status not yet Completed then proves the version
            # was read before the end (read after it, a loaded machine may let the workflow end between)
            version = (await get_json(http, version_url))[1]["current_version"]
            status, body = await get_json(http, f"{base}/jobs", id=wid)
            if body["job"]["status"] == "Completed":
                break
            seen.add(body["job"]["status"])
            assert len(seen) <= 2 and seen <= {"Pending", "Running"}
            assert version == OLD  # not before the end
            await asyncio.sleep(0.02)
        assert "Running" in seen and body["job"]["process"] == "100%" and body["job"]["ended"]
        assert (await get_json(http, version_url))[1]["current_version"] == NEW
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            assert (resp.status, (await resp.json())["error_code"]) == (400, "DBS.05000008")

        status, body = await get_json(http, f"{base}/jobs", id="00000000-0000-4000-8000-000000000000")
        assert (status, body["error_code"]) == (400, "DBS.200543")
        status, body = await get_json(http, f"{base}/instances/{INST}/proxy/{P1}/upgrade-version")
        assert (status, body["error_code"]) == (404, "APIGW.0101")

        log = sim.log
        assert [r["route"] for r in log][:5] == [
            "instances",
            "proxies",
            "proxies",
            "proxy_version",
            "upgrade",
        ]
        upgrades = [r for r in log if r["route"] == "upgrade"]
        assert [(r["http_status"], r["effect"]) for r in upgrades] == [
            (200, "applied"),
            (409, "none"),
            (400, "none"),
        ]
        assert upgrades[0]["workflows"] == [wid] and upgrades[0]["proxy_id"] == P1
        assert all(r["answered_at"] >= r["received_at"] for r in log)
        assert [r["seq"] for r in log] == sorted(r["seq"] for r in log)


async def test_error_bodies_of_the_upgrade_call(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario()) as sim:
        cases = [
            (upgrade_url(sim, "f" * 32 + "in07"), BODY, 404, "DBS.200002"),
            (upgrade_url(sim, INST, "f" * 32 + "po01"), BODY, 400, "DBS.270024"),
            (upgrade_url(sim), {"source_version": OLD}, 400, "DBS.200001"),
            (upgrade_url(sim), {"source_version": "2.23.06.000", "target_version": NEW}, 400, "DBS.05000001"),
            (upgrade_url(sim), {"source_version": OLD, "target_version": "9.0.0.0"}, 400, "DBS.200001"),
        ]
        for url, body, status, code in cases:
            async with http.post(url, json=body) as resp:
                answer = await resp.json()
                assert (resp.status, answer["error_code"]) == (status, code)
                assert answer["error_msg"]
        async with http.post(upgrade_url(sim), data=b"{not json") as resp:
            assert (resp.status, (await resp.json())["error_code"]) == (400, "DBS.200001")


async def test_mixed_accept_and_reject(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario()) as sim:
        async with http.post(upgrade_url(sim, INST, P2), json=BODY) as resp:
            items = (await resp.json())["update_result"]
        assert [(i["state"], i["error_message"]) for i in items] == [
            ("ACCEPT", None),
            ("REJECT", "Upgrade failed due to insufficient subnet ip"),
        ]
        (record,) = sim.log
        assert record["effect"] == "applied" and record["workflows"] == [items[0]["workflow_id"]]
        assert [i["state"] for i in record["items"]] == ["ACCEPT", "REJECT"]


async def test_reset_after_applies_the_upgrade_then_drops_the_connection(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"reset_after": 1.0})) as sim:
        sent_at = time.time()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(upgrade_url(sim), json=BODY) as resp:
                await resp.read()
        (record,) = sim.log
        assert (record["http_status"], record["fault"], record["effect"]) == (
            "reset",
            "reset_after",
            "applied",
        )
        (wid,) = record["workflows"]
        async with http.get(f"{sim.url}/_sim/fleet") as resp:
            fleet = {p["proxy_id"]: p for p in await resp.json()}
        assert [w["id"] for w in fleet[P1]["workflows"]] == [wid]
        assert fleet[P1]["upgrade_calls"] == fleet[P1]["accepted_calls"] == 1

        # The client lost the answer: immediate-jobs is how it learns the workflow id.
        start = datetime.fromtimestamp(int(sent_at) - 1, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await asyncio.sleep(0.06)
        status, body = await get_json(
            http, f"{sim.url}/v3/{PROJECT}/immediate-jobs", limit="10", start_time=start
        )
        assert status == 200
        matches = [j for j in body["jobs"] if j["instance_id"] == INST]
        assert [j["job_id"] for j in matches] == [wid]
        assert json.loads(matches[0]["extend_fields"])["proxy_id"] == P1
        status, body = await get_json(http, f"{sim.url}/v3/{PROJECT}/immediate-jobs", limit="30")
        assert (status, body["error_code"]) == (400, "DBS.200001")


async def test_reset_before_changes_nothing(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"reset_before": 1.0})) as sim:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(upgrade_url(sim), json=BODY) as resp:
                await resp.read()
        assert sim.fleet.workflows == {}
        assert sim.log[0]["http_status"] == "reset" and sim.log[0]["effect"] == "none"


async def test_hang_is_cancelled_when_the_client_gives_up(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"timeout": 1.0, "hang_s": 30})) as sim:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with http.post(upgrade_url(sim), json=BODY, timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
        await wait_for(lambda: sim.in_flight == 0)  # the server's handler did not keep sleeping
        assert time.monotonic() - started < 2
        assert sim.log[0]["http_status"] == "hang" and sim.fleet.workflows == {}


async def test_timeout_after_applies_the_upgrade(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"timeout_after": 1.0})) as sim:
        with pytest.raises(TimeoutError):
            async with http.post(upgrade_url(sim), json=BODY, timeout=aiohttp.ClientTimeout(total=0.2)) as r:
                await r.read()
        assert len(sim.fleet.workflows) == 1 and sim.log[0]["effect"] == "applied"
    assert sim.in_flight == 0  # close() did not wait for the 120 s hang


async def test_malformed_after_answers_garbage_but_applied(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"malformed_after": 1.0})) as sim:
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            raw = await resp.read()
        assert resp.status == 200
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        assert not (isinstance(parsed, dict) and isinstance(parsed.get("update_result"), list))
        assert len(sim.fleet.workflows) == 1


async def test_429_with_retry_after_and_only_on_covered_routes(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"http_429": 1.0, "retry_after_s": 4})) as sim:
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            body = await resp.json()
            assert (resp.status, resp.headers["Retry-After"], body["error_code"]) == (429, "4", "APIGW.0308")
        assert "policy user over ratelimit" in body["error_msg"]
        status, _ = await get_json(http, f"{sim.url}/v3/{PROJECT}/instances")  # not a covered route
        assert status == 200
        assert sim.fleet.workflows == {}


async def test_gateway_rate_limit_throttles_real_bursts(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(faults={"gateway_rate_limit": 5})) as sim:
        url = f"{sim.url}/v3/{PROJECT}/instances"
        statuses = [(await get_json(http, url))[0] for _ in range(8)]
        assert statuses == [200] * 5 + [429] * 3
        assert sim.stats["http_status"]["429"] == 3


async def test_patch_fixes_the_subnet_and_ends_a_storm(http: aiohttp.ClientSession) -> None:
    sc = scenario(faults={"http_503": 1.0})
    async with await serve(sc) as sim:
        async with http.post(upgrade_url(sim, INST, P2), json=BODY) as resp:
            assert resp.status == 503
        patch = {"faults": {"http_503": 0}, "proxies": {P2: {"reject": None}}}
        async with http.post(f"{sim.url}/_sim/patch", json=patch) as resp:
            state = await resp.json()
        assert state["faults"]["http_503"] == 0 and state["proxies"][P2]["reject"] is None
        async with http.post(upgrade_url(sim, INST, P2), json=BODY) as resp:
            items = (await resp.json())["update_result"]
        assert [i["state"] for i in items] == ["ACCEPT", "ACCEPT"]
        async with http.post(f"{sim.url}/_sim/patch", json={"faults": {"http_503": 2}}) as resp:
            assert resp.status == 400
        async with http.post(f"{sim.url}/_sim/patch", json={"nonsense": 1}) as resp:
            assert resp.status == 400


async def test_stats_count_calls_and_concurrency(http: aiohttp.ClientSession) -> None:
    async with await serve(scenario(latency_s=0.2)) as sim:
        url = f"{sim.url}/v3/{PROJECT}/instances/{INST}/proxy/{P1}/taurusproxy/proxy-version"
        results = await asyncio.gather(*(get_json(http, url) for _ in range(20)))
        assert all(status == 200 for status, _ in results)
        async with http.get(f"{sim.url}/_sim/stats") as resp:
            stats = await resp.json()
        assert stats["calls"] == {"proxy_version": 20} and stats["total_calls"] == 20
        assert stats["max_concurrent"] == 20 == max(r["concurrent"] for r in sim.log)
        async with http.get(f"{sim.url}/_sim/log") as resp:
            assert len(await resp.json()) == 20


async def test_token_flow(http: aiohttp.ClientSession) -> None:
    auth = {"mode": "token", "users": [{"name": "ops", "domain": "acme", "password": "s3cret-pass"}]}
    async with await serve(scenario(auth=auth)) as sim:
        url = f"{sim.url}/v3/{PROJECT}/instances"
        async with http.get(url) as resp:
            body = await resp.json()
            assert (resp.status, body["error_code"]) == (401, "APIGW.0301")
            assert body["error_msg"].startswith("Incorrect IAM authentication information: ")
        iam = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": "ops", "password": "s3cret-pass", "domain": {"name": "acme"}}
                    },
                },
                "scope": {"project": {"id": PROJECT}},
            }
        }
        async with http.post(f"{sim.url}/v3/auth/tokens?nocatalog=true", json=iam) as resp:
            assert resp.status == 201
            token = resp.headers["X-Subject-Token"]
            assert (await resp.json())["token"]["expires_at"].endswith("Z")
        async with http.get(url, headers={"X-Auth-Token": token}) as resp:
            assert resp.status == 200
        iam["auth"]["identity"]["password"]["user"]["password"] = "wrong"  # type: ignore[index]
        async with http.post(f"{sim.url}/v3/auth/tokens", json=iam) as resp:
            assert resp.status == 401
        assert (sim.stats["token_issues"], sim.stats["auth_failures"]) == (1, 2)
        assert "s3cret-pass" not in json.dumps(sim.log) and token not in json.dumps(sim.log)


async def test_aksk_signed_by_our_signer_and_by_the_official_sdk(http: aiohttp.ClientSession) -> None:
    sdk_signer = pytest.importorskip("huaweicloudsdkcore.signer.signer")
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.sdk_request import SdkRequest

    ak, sk = "AKSIMULATOR", "SKsimulator-secret"
    async with await serve(scenario(auth={"mode": "aksk", "keys": [{"ak": ak, "sk": sk}]})) as sim:
        url = upgrade_url(sim)
        payload = json.dumps(BODY).encode()
        headers = sign_request(
            ak,
            sk,
            "POST",
            url,
            {"Content-Type": "application/json;charset=UTF-8"},
            payload,
            project_id=PROJECT,
        )
        async with http.post(url, data=payload, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(url, data=payload + b" ", headers=headers) as resp:  # body changed after signing
            assert (resp.status, (await resp.json())["error_code"]) == (401, "APIGW.0301")

        host = f"127.0.0.1:{sim.port}"
        resource = f"/v3/{PROJECT}/instances"
        request = SdkRequest(
            method="GET",
            schema="http",
            host=host,
            resource_path=resource,
            uri=resource,
            header_params={"X-Project-Id": PROJECT},
            query_params=[("limit", 10), ("name", "al")],
            body="",
        )
        signed = sdk_signer.Signer(BasicCredentials(ak, sk)).sign(request)
        async with http.get(f"{sim.url}{signed.uri}", headers=signed.header_params) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert [i["name"] for i in body["instances"]] == ["alpha"]
        async with http.get(f"{sim.url}{resource}") as resp:
            assert resp.status == 401
        assert sim.stats["auth_failures"] == 2
        assert sk not in json.dumps(sim.log)


async def test_log_file_is_flushed_per_record(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    log_file = tmp_path / "calls.jsonl"
    async with await serve(scenario(), log_file=log_file) as sim:
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            await resp.read()
        await get_json(http, f"{sim.url}/v3/{PROJECT}/instances")
        lines = log_file.read_text(encoding="utf-8").splitlines()  # read while the server still runs
        assert [json.loads(line) for line in lines] == sim.log
        assert [json.loads(line)["route"] for line in lines] == ["upgrade", "instances"]


def test_run_simulator_as_a_process_with_the_bundled_demo(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "from orchestrator.simulator import run_simulator; "
        f"run_simulator(None, '127.0.0.1', 0, {str(tmp_path / 'log.jsonl')!r}, {str(ready)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert ready.read_text(encoding="utf-8").strip() == url

        async def probe() -> Any:
            async with aiohttp.ClientSession() as session:
                status, body = await get_json(session, f"{url}/v3/054e292c9880d4992f02c0196d3ea468/instances")
                assert status == 200
                return body

        body = asyncio.run(probe())
        assert body["total_count"] == 149
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert len((tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("offset", [0.0, -7200.0, 300.0])
async def test_date_headers_and_job_times_are_on_the_simulated_clouds_clock(
    http: aiohttp.ClientSession, offset: float
) -> None:
    from email.utils import parsedate_to_datetime

    async with await serve(scenario(clock_offset_s=offset)) as sim:
        base = f"{sim.url}/v3/{PROJECT}"
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            date = parsedate_to_datetime(resp.headers["Date"]).timestamp()
            wid = (await resp.json())["update_result"][0]["workflow_id"]
        assert abs(date - (time.time() + offset)) < 2.0
        async with http.get(f"{base}/instances/nope/proxies") as resp:  # error answers carry it too
            assert resp.status == 404
            assert abs(parsedate_to_datetime(resp.headers["Date"]).timestamp() - (time.time() + offset)) < 2.0
        await asyncio.sleep(0.06)
        status, body = await get_json(http, f"{base}/jobs", id=wid)
        created = datetime.strptime(body["job"]["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        assert status == 200 and abs(created - (time.time() + offset)) < 2.0

        def window(t: float) -> str:
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        cloud_now = time.time() + offset
        _, found = await get_json(
            http, f"{base}/immediate-jobs", start_time=window(cloud_now - 10), limit="10"
        )
        assert [j["job_id"] for j in found["jobs"]] == [wid]
        if offset < 0:  # a window on the host's clock lies in the cloud's future: nothing yet
            _, none = await get_json(http, f"{base}/immediate-jobs", start_time=window(time.time() - 10))
            assert none["jobs"] == []


async def test_reset_serves_a_new_scenario_as_if_just_started(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """``POST /_sim/reset``: a new fleet, call log (its own file) and counters on the same port; refused
    while calls are in flight and for a scenario that does not load (the old one stays)."""
    first_log, second_log = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with SimulatorServer(scenario(), log_file=first_log) as sim:
        async with http.post(upgrade_url(sim), json=BODY) as resp:
            assert resp.status == 200
        assert sim.stats["total_calls"] == 1
        assert sim.fleet.snapshot()[0]["current_version"] in (OLD, NEW)

        other = tmp_path / "other.yaml"
        other.write_text(
            json.dumps({"seed": 1, "project_id": PROJECT, "fleet": {"generate": {"proxies": 5}}}),
            encoding="utf-8",
        )
        # a scenario that does not load: 400, the old scenario goes on serving
        bad = tmp_path / "bad.yaml"
        bad.write_text("fleet: {generate: {proxies: -1}}\n", encoding="utf-8")
        async with http.post(f"{sim.url}/_sim/reset", json={"scenario": str(bad)}) as resp:
            assert resp.status == 400, await resp.text()
        assert len(sim.fleet.snapshot()) == 3 and sim.stats["total_calls"] == 1

        # calls in flight: refused (their records would land in the next call log)
        sim.in_flight += 1
        async with http.post(
            f"{sim.url}/_sim/reset", json={"scenario": str(other), "log_file": str(second_log)}
        ) as resp:
            assert resp.status == 409, await resp.text()
        sim.in_flight -= 1

        async with http.post(
            f"{sim.url}/_sim/reset", json={"scenario": str(other), "log_file": str(second_log)}
        ) as resp:
            assert resp.status == 200, await resp.text()
        assert sim.stats == {
            "total_calls": 0, "calls": {}, "http_status": {}, "max_concurrent": 0, "in_flight": 0,
            "token_issues": 0, "auth_failures": 0, "faults": {}, "workflows": 0,
        }  # fmt: skip
        assert sim.log == []
        fleet = sim.fleet.snapshot()
        assert len(fleet) == 5 and all(p["current_version"] != p["latest_version"] for p in fleet)
        p = fleet[0]
        url = f"{sim.url}/v3/{PROJECT}/instances/{p['instance_id']}/proxy/{p['proxy_id']}/upgrade-version"
        async with http.post(
            url, json={"source_version": p["current_version"], "target_version": p["latest_version"]}
        ) as resp:
            assert resp.status == 200
        assert [r["seq"] for r in sim.log] == [1]
    # each call went to its own scenario's log file
    assert len(first_log.read_text().splitlines()) == 1
    assert [json.loads(x)["proxy_id"] for x in second_log.read_text().splitlines()] == [p["proxy_id"]]
