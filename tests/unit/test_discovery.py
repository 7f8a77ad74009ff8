"""Discovery: instances, proxies and versions through the cloud seam, an inventory that validates, and a
stop at the first refused credential."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from orchestrator.cloud.api import CloudApi, InstancePage, OnSent
from orchestrator.cloud.auth import NoAuth
from orchestrator.cloud.client import CloudClient, make_session
from orchestrator.cloud.fake import FakeCloud, Fault, loop_clock
from orchestrator.discovery import (
    CredentialsRefused,
    Discovery,
    DiscoveryError,
    discover,
    render_inventory,
)
from orchestrator.inventory import load_inventory
from orchestrator.outcomes import InstanceInfo, TransportFailure, TransportKind
from orchestrator.simulator import Fleet, Scenario, SimulatorServer
from tests.virtual import run_virtual

PROJECT = "054e292c9880d4992f02c0196d3ea468"
OLD, NEW, NEWER = "2.23.12.000", "2.24.03.000", "2.25.01.000"
ENDPOINT = "http://127.0.0.1:9"


def iid(n: int) -> str:
    return f"{n:032x}in07"


def pid(n: int) -> str:
    return f"{n:032x}po01"


ORDERS, BILLING, LEGACY = iid(1), iid(2), "legacy_db"
OK, AT_TARGET, ABNORMAL, NO_UPGRADE, BILL = pid(11), pid(12), pid(13), pid(14), pid(21)


def scenario(generated: int = 0) -> Scenario:
    data: dict[str, Any] = {
        "seed": 4,
        "project_id": PROJECT,
        "fleet": {
            "instances": [
                {
                    "id": ORDERS,
                    "name": "orders-db",
                    "proxies": [
                        {"id": OK, "name": "orders-rw"},
                        {"id": AT_TARGET, "name": "orders-ro", "current_version": NEW},
                        {"id": ABNORMAL, "name": "orders-bad", "status": "ABNORMAL"},
                        {"id": NO_UPGRADE, "name": "orders-pinned", "can_upgrade": False},
                    ],
                },
                {"id": BILLING, "name": "billing-db", "proxies": [{"id": BILL}]},
                {"id": LEGACY, "name": "orders-legacy", "proxies": [{"id": "px1"}]},
            ]
        },
    }
    if generated:
        data["fleet"]["generate"] = {"instances": generated, "name_prefix": "gen"}
    return Scenario.from_dict(data)


def fake(generated: int = 0) -> FakeCloud:
    return FakeCloud(Fleet(scenario(generated), clock=loop_clock()))


def write_and_load(tmp_path: Path, text: str) -> list[tuple[str, str, str | None, str]]:
    path = tmp_path / "discovered.yaml"
    path.write_text(text, encoding="utf-8")
    inv = load_inventory(path)
    return [(e.instance_id, e.proxy_id, e.source_version, e.target_version) for e in inv.entries()]


def test_discovery_decides_each_proxy_and_writes_an_inventory_that_validates(tmp_path: Path) -> None:
    async def go() -> tuple[Discovery, FakeCloud]:
        cloud = fake()
        return await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4"), cloud

    found, cloud = run_virtual(go)
    skips = {p.proxy_id: p.skip for p in found.proxies}
    assert skips == {
        OK: None,
        AT_TARGET: f"already at target {NEW}",
        ABNORMAL: "not ACTIVE (status ABNORMAL)",
        NO_UPGRADE: f"no upgrade available (can_upgrade false; runs {OLD}, latest {NEW})",
        BILL: None,
        "px1": 'instance id "legacy_db" is not usable in an inventory',
    }
    # one instance page, three proxy lists, versions of the four usable ACTIVE proxies only
    assert [r["route"] for r in cloud.log].count("proxy_version") == 4 and found.calls == len(cloud.log) == 8
    text = render_inventory(found, header_comment="orchestrator discover --project-id P\nsecond line")
    assert write_and_load(tmp_path, text) == [(ORDERS, OK, OLD, NEW), (BILLING, BILL, OLD, NEW)]
    assert text.startswith("# orchestrator discover --project-id P\n# second line\n")
    assert f"#   instance orders-db ({ORDERS}) proxy orders-ro ({AT_TARGET}): already at target {NEW}" in text
    assert "proxy orders-bad" in text and "not ACTIVE (status ABNORMAL)" in text
    assert "3 instance(s), 6 proxies found: 2 to upgrade, 4 skipped (target: latest)" in text
    data = yaml.safe_load(text)
    assert data["defaults"] == {
        "project_id": PROJECT,
        "region": "cn-north-4",
        "endpoint": ENDPOINT,
        "target_version": NEW,
    }
    assert data["proxies"][0]["name"] == "orders-db/orders-rw"


def test_name_glob_and_an_explicit_target(tmp_path: Path) -> None:
    async def go(target: str) -> Discovery:
        return await discover(
            fake(), project_id=PROJECT, endpoint=ENDPOINT, region=None, name_glob="orders-*", target=target
        )

    found = run_virtual(lambda: go(NEW))
    assert {i.name for i in found.instances} == {"orders-db", "orders-legacy"}
    assert [p.proxy_id for p in found.to_upgrade] == [OK]
    beyond = run_virtual(lambda: go(NEWER))
    assert {p.proxy_id: p.skip for p in beyond.proxies}[
        OK
    ] == f"no upgrade available to {NEWER} (latest is {NEW})"
    older = run_virtual(lambda: go("2.23.06.000"))
    assert {p.proxy_id: p.skip for p in older.proxies}[OK] == f"runs {OLD}, newer than the target 2.23.06.000"
    assert {p.proxy_id: p.skip for p in older.proxies}[
        AT_TARGET
    ] == f"runs {NEW}, newer than the target 2.23.06.000"
    same = run_virtual(lambda: go("2.24.3"))  # trailing zero parts do not count
    assert {p.proxy_id: p.skip for p in same.proxies}[AT_TARGET] == "already at target 2.24.3"
    with pytest.raises(DiscoveryError, match="target must be 'latest' or a version"):
        run_virtual(lambda: go("newest"))


def test_instances_are_paged_to_the_total(tmp_path: Path) -> None:
    async def go() -> tuple[Discovery, FakeCloud]:
        cloud = fake(generated=130)
        return await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4"), cloud

    found, cloud = run_virtual(go)
    assert len(found.instances) == 133 and len(found.to_upgrade) == 132
    pages = [r for r in cloud.log if r["route"] == "instances"]
    assert len(pages) == 2
    assert len(write_and_load(tmp_path, render_inventory(found))) == 132


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_credential_stops_at_the_first_call(status: int) -> None:
    """Issue 10 kind 6: never thirty bad signed calls (five lock the key): exactly one."""

    async def go() -> FakeCloud:
        cloud = fake(generated=30)
        cloud.inject(
            "instances", Fault.http(status, "APIGW.0301", "Incorrect IAM authentication information")
        )
        with pytest.raises(CredentialsRefused) as err:
            await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4")
        assert err.value.http_status == status and err.value.error_code == "APIGW.0301"
        assert "\n" not in str(err.value) and "nothing more was sent" in str(err.value)
        return cloud

    cloud = run_virtual(go)
    assert len(cloud.log) == 1 and cloud.not_sent == []


def test_a_refusal_later_on_stops_every_worker_from_sending_again() -> None:
    async def go() -> FakeCloud:
        cloud = fake(generated=20)
        for proxy in cloud.fleet.proxies:
            if proxy != AT_TARGET:
                cloud.inject("proxy_version", Fault.delay(1.0), proxy_id=proxy)
        cloud.inject("proxy_version", Fault.http(401, "APIGW.0301").with_delay(0.5), proxy_id=AT_TARGET)
        with pytest.raises(CredentialsRefused):
            await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4", concurrency=4)
        return cloud

    cloud = run_virtual(go)
    versions = [r for r in cloud.log if r["route"] == "proxy_version"]
    assert [r["http_status"] for r in versions].count(401) == 1
    # only the calls already in flight when the refusal came (concurrency 4) were sent; none after it
    assert len(versions) == 4 and cloud.not_sent == []


def test_transient_failures_are_retried_with_retry_after() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def go() -> Discovery:
        cloud = fake()
        cloud.inject("instances", Fault.http(503, "APIGW.0202"), Fault.http(429, "APIGW.0308", retry_after=3))
        cloud.inject("proxy_version", Fault.lost(applied=False), proxy_id=OK)
        return await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4", sleep=sleep)

    found = run_virtual(go)
    assert slept == [1.0, 3.0, 1.0] and len(found.to_upgrade) == 2 and found.problems == ()


@pytest.mark.parametrize(
    ("route", "fault", "proxy", "problem"),
    [
        ("proxy_version", Fault.http(500, "DBS.05000000"), OK, "proxy orders-rw"),
        ("proxies", Fault.raw(200, b"{}"), ORDERS, "instance orders-db"),
    ],
)
def test_what_cannot_be_read_is_a_problem_not_a_guess(
    tmp_path: Path, route: str, fault: Fault, proxy: str, problem: str
) -> None:
    async def go() -> Discovery:
        cloud = fake()
        if route == "proxies":
            cloud.inject(route, *[fault] * 3)  # the first instance's listing, three times
        else:
            cloud.inject(route, *[fault] * 3, proxy_id=proxy)
        return await discover(
            cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4", sleep=_no_sleep
        )

    found = run_virtual(go)
    assert [p.proxy_id for p in found.to_upgrade] == [BILL]
    assert len(found.problems) == 1 and found.problems[0].startswith(problem)
    text = render_inventory(found)
    assert f"# problem: {problem}" in text
    assert write_and_load(tmp_path, text) == [(BILLING, BILL, OLD, NEW)]


def test_an_instance_list_that_cannot_be_read_stops_discovery() -> None:
    async def go() -> None:
        cloud = fake()
        cloud.inject("instances", *[Fault.http(500)] * 3)
        await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region=None, sleep=_no_sleep)

    with pytest.raises(DiscoveryError, match=r"cannot list the instances .* HTTP 500"):
        run_virtual(go)


async def _no_sleep(seconds: float) -> None:
    return None


def test_every_call_takes_a_permit_and_reports_its_send() -> None:
    taken: list[int] = []
    sent: list[int] = []

    @asynccontextmanager
    async def permit() -> AsyncIterator[OnSent]:
        taken.append(1)
        yield lambda: sent.append(1)

    async def go() -> FakeCloud:
        cloud = fake()
        await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region=None, permit=permit)
        return cloud

    cloud = run_virtual(go)
    assert len(taken) == len(sent) == len(cloud.log) == 8


class _StuckPager:
    """A server that ignores offset: every page is the first one."""

    def __init__(self) -> None:
        self.calls = 0

    async def list_instances(self, ref: Any, **kw: Any) -> InstancePage:
        self.calls += 1
        return InstancePage((InstanceInfo(ORDERS, "orders-db", "ACTIVE"),), total_count=1000)

    async def list_proxies(self, ref: Any, **kw: Any) -> TransportFailure:
        return TransportFailure(TransportKind.TLS, sent=False, detail="certificate has expired")


def test_a_server_that_ignores_offset_is_not_asked_forever_and_tls_stops() -> None:
    stuck = _StuckPager()
    with pytest.raises(DiscoveryError, match="certificate has expired"):
        asyncio.run(discover(cast(CloudApi, stuck), project_id=PROJECT, endpoint=ENDPOINT, region=None))
    assert stuck.calls == 2


def test_rendering_keeps_foreign_names_inert_and_refuses_an_empty_inventory(tmp_path: Path) -> None:
    evil = "x\nproxies: []\n# \u2028[/bold] \x07"

    async def go() -> Discovery:
        sc = scenario()
        sc.fleet.instances[0].name = evil
        cloud = FakeCloud(Fleet(sc, clock=loop_clock()))
        return await discover(cloud, project_id=PROJECT, endpoint=ENDPOINT, region="cn-north-4")

    found = run_virtual(go)
    text = render_inventory(found, header_comment="a\nb")
    assert all(line.startswith(("#", "defaults:", "  ", "proxies:")) for line in text.splitlines())
    assert [e[1] for e in write_and_load(tmp_path, text)] == [OK, BILL]
    nothing = Discovery(PROJECT, ENDPOINT, None, "latest", None, (), ())
    with pytest.raises(ValueError, match="no proxy to upgrade"):
        render_inventory(nothing)


async def test_discovery_against_the_simulator_over_http(tmp_path: Path) -> None:
    """The acceptance path: discover against the simulator, write, validate."""
    async with SimulatorServer(scenario(generated=3)) as sim:
        session = make_session()
        try:
            client = CloudClient(session, NoAuth())
            found = await discover(client, project_id=PROJECT, endpoint=sim.url, region="cn-north-4")
        finally:
            await session.close()
        routes = [r["route"] for r in sim.log]
    assert routes.count("instances") == 1 and routes.count("proxies") == 6
    entries = write_and_load(tmp_path, render_inventory(found))
    assert len(entries) == 5 and (ORDERS, OK, OLD, NEW) in entries
    assert client.clock.samples == len(routes)
