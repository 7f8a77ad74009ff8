"""The in-process fake cloud: faithful to the simulator over HTTP, honours the hooks, injects faults on
virtual time, and keeps a call log the simulator-log helpers can judge."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator.cloud.api import CloudApi, InstancePage, InstanceRef, ProjectRef, ProxyPage, ProxyRef
from orchestrator.cloud.auth import NoAuth
from orchestrator.cloud.client import CloudClient, make_session
from orchestrator.cloud.fake import DEFAULT_EPOCH, FakeCloud, Fault, loop_clock
from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    TransportFailure,
    TransportKind,
    VersionInfo,
    WorkflowInfo,
)
from orchestrator.simulator import Fleet, Scenario, SimulatorServer
from orchestrator.simulator.faults import FaultInjector
from tests import simlog
from tests.virtual import run_virtual

PROJECT = "054e292c9880d4992f02c0196d3ea468"
INST, INST2 = "517ea793ab91438cbfcd9c4b1c958b1ein07", "627ea793ab91438cbfcd9c4b1c958b1ein07"
P1, P2, P3 = (f"{c * 32}po01" for c in "abc")
OLD, NEW = "2.23.12.000", "2.24.03.000"
ENDPOINT = "http://127.0.0.1:9"  # never connected to: the fake has no sockets


def scenario(**extra: Any) -> Scenario:
    data: dict[str, Any] = {
        "seed": 11,
        "project_id": PROJECT,
        "workflow": {"pending_s": 5, "running_s": 60, "job_visible_after_s": 0},
        "fleet": {
            "instances": [
                {
                    "id": INST,
                    "name": "alpha",
                    "proxies": [
                        {"id": P1},
                        {"id": P2, "nodes": 2, "reject": "Upgrade failed due to insufficient subnet ip",
                         "reject_nodes": [1]},
                    ],
                },
                {"id": INST2, "name": "beta", "proxies": [{"id": P3, "script": [{"fault": "reset_after"}]}]},
            ]
        },
    }  # fmt: skip
    data.update(extra)
    return Scenario.from_dict(data)


def ref(proxy: str = P1, instance: str = INST, endpoint: str = ENDPOINT) -> ProxyRef:
    return ProxyRef(project_id=PROJECT, instance_id=instance, proxy_id=proxy, endpoint=endpoint)


def virtual_fake(**extra: Any) -> tuple[FakeCloud, Fleet]:
    """Call inside run_virtual: the fleet's clock follows the virtual loop."""
    fleet = Fleet(scenario(**extra), clock=loop_clock())
    return FakeCloud(fleet), fleet


def strip(outcome: Any) -> Any:
    """An outcome without its per-call request id (random on both sides)."""
    if dataclasses.is_dataclass(outcome) and hasattr(outcome, "request_id"):
        return dataclasses.replace(outcome, request_id=None)  # type: ignore[type-var]
    return outcome


async def script(api: CloudApi, endpoint: str) -> list[Any]:
    project = ProjectRef(project_id=PROJECT, endpoint=endpoint)
    out: list[Any] = [
        await api.list_instances(project, offset=0, limit=1),
        await api.list_instances(project, name="bet"),
        await api.list_proxies(InstanceRef(PROJECT, INST, endpoint), offset=0, limit=100),
        await api.list_proxies(InstanceRef(PROJECT, INST, endpoint), limit=0),
        await api.proxy_version(ref(P1, endpoint=endpoint)),
        await api.upgrade(ref(P2, endpoint=endpoint), OLD, NEW),  # mixed ACCEPT + REJECT
        await api.upgrade(ref(P1, endpoint=endpoint), OLD, NEW),  # busy: the instance has a workflow
        await api.upgrade(ref("nope", endpoint=endpoint), OLD, NEW),
        await api.upgrade(ref(P3, INST2, endpoint=endpoint), "1.0", NEW),  # version mismatch
        await api.upgrade(ref(P3, INST2, endpoint=endpoint), OLD, NEW),  # scripted reset_after
        await api.job(project, "00000000-0000-4000-8000-000000000000"),
    ]
    answered = out[5]
    assert isinstance(answered, Answered)
    out.append(await api.job(project, answered.items[0].workflow_id or ""))
    return out


async def test_the_fake_answers_as_the_simulator_does_over_http() -> None:
    """Faithfulness: the same calls give the same outcomes through HTTP + client and through the fake."""
    async with SimulatorServer(scenario()) as sim:
        session = make_session()
        try:
            over_http = await script(CloudClient(session, NoAuth()), sim.url)
        finally:
            await session.close()
        http_log = sim.log
    fake = FakeCloud(Fleet(scenario()))
    in_process = await script(fake, ENDPOINT)
    for a, b in zip(over_http, in_process, strict=True):
        if isinstance(a, WorkflowInfo):  # times differ by the moments of the two runs
            assert isinstance(b, WorkflowInfo) and (a.workflow_id, a.status) == (b.workflow_id, b.status)
        elif isinstance(a, TransportFailure):
            assert isinstance(b, TransportFailure) and (a.kind, a.sent) == (b.kind, b.sent)
        else:
            assert strip(a) == strip(b)
    keys = ("route", "proxy_id", "http_status", "error_code", "effect", "workflows", "fault")
    assert [{k: r.get(k) for k in keys} for r in fake.log] == [{k: r.get(k) for k in keys} for r in http_log]
    assert simlog.created_workflow_ids(fake.log) == simlog.created_workflow_ids(http_log)


def test_hooks_may_send_refuses_before_the_fleet_sees_anything_and_on_sent_fires_once() -> None:
    async def go() -> None:
        fake, fleet = virtual_fake()
        sent: list[int] = []
        res = await fake.upgrade(ref(), OLD, NEW, on_sent=lambda: sent.append(1), may_send=lambda: False)
        assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.CONNECT, False)
        assert res.detail.startswith("not sent: ")
        assert sent == [] and fake.log == [] and fleet.proxies[P1].upgrade_calls == 0
        assert [r["route"] for r in fake.not_sent] == ["upgrade"]
        ok = await fake.upgrade(ref(), OLD, NEW, on_sent=lambda: sent.append(1), may_send=lambda: True)
        assert isinstance(ok, Answered) and sent == [1] and fleet.proxies[P1].upgrade_calls == 1

    run_virtual(go)


def transport(kind: str, text: str = "") -> Any:
    return lambda r: isinstance(r, TransportFailure) and r.kind == kind and r.sent and text in r.detail


def http(status: int, code: str | None = None, retry_after: float | None = None, text: str = "") -> Any:
    return lambda r: (
        isinstance(r, HttpFailure)
        and (r.http_status, r.error_code, r.retry_after) == (status, code, retry_after)
        and text in (r.error_msg or "")
    )


@pytest.mark.parametrize(
    ("fault", "applied", "check"),
    [
        (Fault.lost(), True, transport("reset")),
        (Fault.lost(applied=False), False, transport("reset")),
        (Fault.http(503, "APIGW.0202", retry_after=2), False, http(503, "APIGW.0202", 2.0)),
        (Fault.gateway(502), True, http(502, text="<html>")),
        (Fault.gateway(503, applied=False), False, http(503, text="<html>")),
        (Fault.null_workflow_id(), True, transport("malformed", "ACCEPT without")),
        (Fault.lower_case_state(), True, transport("malformed", '"accept"')),
        (Fault.raw(200, b"<html>ok</html>"), True, transport("malformed", "not JSON")),
        (Fault.delay(5.0), True, lambda r: isinstance(r, Answered)),
    ],
)
def test_injected_upgrade_faults(fault: Fault, applied: bool, check: Any) -> None:
    async def go() -> None:
        fake, fleet = virtual_fake()
        fake.inject("upgrade", fault)
        res = await fake.upgrade(ref(), OLD, NEW)
        assert check(res), res
        assert simlog.applied_per_proxy(fake.log)[P1] == (1 if applied else 0)
        assert bool(fleet.proxies[P1].workflows) is applied
        assert fake.pending_faults() == 0
        (record,) = fake.log
        assert record["fault"] == (None if fault.kind == "pass" else f"injected:{fault.kind}")
        again = await fake.upgrade(ref(), OLD, NEW)  # the fault was for one call only
        assert isinstance(again, HttpFailure if applied else Answered)

    run_virtual(go)


def test_delays_and_timeouts_run_on_the_virtual_clock() -> None:
    async def go() -> None:
        fake, _ = virtual_fake()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fake.inject(
            "proxy_version", Fault.delay(5.0), Fault.lost(timeout=True), Fault.lost().with_delay(1, 2)
        )
        assert isinstance(await fake.proxy_version(ref()), VersionInfo)
        assert loop.time() - t0 == pytest.approx(5.0)
        first = fake.log[0]
        assert first["received_at"] - DEFAULT_EPOCH == pytest.approx(t0 + 5.0)
        res = await fake.proxy_version(ref())
        assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.TIMEOUT, True)
        assert loop.time() - t0 == pytest.approx(35.0)  # + the fake's 30 s timeout
        await fake.proxy_version(ref())
        assert loop.time() - t0 == pytest.approx(38.0)
        assert [r["http_status"] for r in fake.log] == [200, "hang", "reset"]

    run_virtual(go)


def test_faults_for_one_proxy_leave_the_others_alone() -> None:
    async def go() -> None:
        fake, _ = virtual_fake()
        fake.inject("proxy_version", Fault.http(500), proxy_id=P2)
        assert isinstance(await fake.proxy_version(ref(P1)), VersionInfo)
        assert isinstance(await fake.proxy_version(ref(P2)), HttpFailure)
        with pytest.raises(ValueError, match="unknown route"):
            fake.inject("upgrades", Fault.lost())

    run_virtual(go)


def test_the_scenarios_seeded_faults_are_drawn_as_the_simulator_draws_them() -> None:
    async def go() -> None:
        sc = scenario(faults={"http_503": 1.0, "routes": ["job"]})
        fake = FakeCloud(Fleet(sc, clock=loop_clock()), injector=FaultInjector(sc.faults, sc.seed))
        assert isinstance(await fake.proxy_version(ref()), VersionInfo)  # not in the fault routes
        res = await fake.job(ProjectRef(PROJECT, ENDPOINT), "x")
        assert isinstance(res, HttpFailure) and (res.http_status, res.error_code) == (503, "APIGW.0202")
        assert fake.log[-1]["fault"] == "http_503"

    run_virtual(go)


def test_the_cloud_clock_is_measured_and_immediate_jobs_use_the_clouds_time() -> None:
    async def go() -> None:
        cloud_clock = loop_clock()
        fleet = Fleet(scenario(), clock=cloud_clock)
        fake = FakeCloud(fleet, local_clock=lambda: cloud_clock() + 240.0)  # our host runs 4 min fast
        answer = await fake.upgrade(ref(), OLD, NEW)
        assert isinstance(answer, Answered)
        offset, unc = fake.clock.offset_s, fake.clock.uncertainty_s
        assert offset is not None and unc is not None and abs(offset + 240.0) <= unc and fake.clock.large
        await asyncio.sleep(10)
        sent_local = datetime.fromtimestamp(fake.clock.now() - 12, UTC)
        project = ProjectRef(PROJECT, ENDPOINT)
        naive = await fake.immediate_jobs(project, start_time=sent_local - timedelta(seconds=2), limit=10)
        assert not isinstance(naive, HttpFailure | TransportFailure) and naive.jobs == ()
        start = fake.clock.to_cloud(sent_local) - timedelta(seconds=2)
        found = await fake.immediate_jobs(project, start_time=start, limit=10)
        assert not isinstance(found, HttpFailure | TransportFailure)
        assert [j.job_id for j in found.jobs] == [answer.items[0].workflow_id]

    run_virtual(go)


def test_listings_page_through_the_fleet() -> None:
    async def go() -> None:
        fleet = Fleet(
            Scenario.from_dict(
                {"seed": 2, "fleet": {"generate": {"instances": 5, "proxies_per_instance": 3}}}
            ),
            clock=loop_clock(),
        )
        fake = FakeCloud(fleet)
        project = ProjectRef(fleet.project_id, ENDPOINT)
        pages = [await fake.list_instances(project, offset=o, limit=2) for o in (0, 2, 4)]
        assert all(isinstance(p, InstancePage) and p.total_count == 5 for p in pages)
        ids = [i.instance_id for p in pages if isinstance(p, InstancePage) for i in p.instances]
        assert ids == list(fleet.instances)
        proxies = await fake.list_proxies(InstanceRef(fleet.project_id, ids[0], ENDPOINT), offset=1, limit=5)
        assert isinstance(proxies, ProxyPage) and len(proxies.proxies) == 2

    run_virtual(go)
