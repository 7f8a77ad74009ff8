"""An in-process ``CloudApi`` over the simulator's ``Fleet``: no sockets, virtual time, injected faults.

For unit tests of the engine's steps (upgrade, reconcile, track) on a virtual clock (issue 12 kind 4).
It is faithful where it matters:

- answers are the fleet's own ``Reply`` objects turned into bytes and headers (JSON body, ``X-Request-Id``,
  ``Date`` on the fleet's clock) and parsed by the **same** functions as the HTTP client
  (``cloud.answers``), so validation, caps and error parsing are the client's;
- ``may_send`` is asked first (False: nothing reaches the fleet, the call returns the client's "not
  sent" failure), then ``on_sent`` is called, then the fleet acts;
- the scenario's scripted faults (``script: [{fault: reset_after}]``) and, when an injector is given,
  its seeded per-call faults are performed as the simulator's HTTP layer performs them;
- every call that reached the fleet leaves a record in ``log`` with the simulator call log's keys
  (``seq, route, project_id, instance_id, proxy_id, workflow_id, received_at, answered_at, http_status,
  error_code, fault, effect, workflows, items, source_version, target_version``), so the helpers of
  ``tests/simlog.py`` judge a fake run as they judge a simulator run. Times are the fleet's clock.

Injected faults (``inject(route, *faults, proxy_id=None)``; each call takes the next fault queued for
its proxy, else for its route)::

    Fault.lost()                 the fleet acts, the answer is lost: RESET, sent=True
    Fault.lost(timeout=True)     the fleet acts, no answer: waits ``timeout_s`` then TIMEOUT, sent=True
    Fault.lost(applied=False)    dropped before the fleet saw it: RESET, sent=True, nothing applied
    Fault.http(503, "APIGW.0202", retry_after=2)   an HTTP error answer; the fleet does nothing
    Fault.gateway(502)           the fleet acts, then the gateway answers 502/503 with an HTML page
    Fault.null_workflow_id()     the fleet acts; ACCEPT items' workflow_id become null
    Fault.lower_case_state()     the fleet acts; items' state lower-cased ("accept")
    Fault.raw(200, b"...")       answer these bytes (after the fleet acted unless applied=False)
    Fault.delay(5.0)             wait 5 s (virtual) before the fleet acts, then answer normally
    any of them with delay_s= / answer_delay_s= (waits before the fleet acts / before the answer)

Time: ``Fleet`` reads its injected clock; on a virtual-time event loop use ``loop_clock()`` so the
fleet's clock follows ``asyncio.sleep``. Delays use ``sleep`` (``asyncio.sleep`` by default).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import json
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from orchestrator.cloud.answers import (
    instances_outcome,
    job_outcome,
    proxies_outcome,
    recent_jobs_outcome,
    upgrade_outcome,
    version_outcome,
)
from orchestrator.cloud.api import (
    NOT_SENT,
    AnyRef,
    Failure,
    InstancePage,
    InstanceRef,
    MaySend,
    OnSent,
    ProxyPage,
    ProxyRef,
    RecentJobs,
)
from orchestrator.cloud.clock import CloudClock
from orchestrator.outcomes import Answered, TransportFailure, TransportKind, VersionInfo, WorkflowInfo
from orchestrator.simulator.faults import (
    AFTER,
    BEFORE,
    HANGS,
    MALFORMED,
    RESETS,
    FaultInjector,
    fault_reply,
    malformed_reply,
)
from orchestrator.simulator.faults import Fault as SimFault
from orchestrator.simulator.fleet import Fleet, Reply, error_reply
from orchestrator.simulator.scenario import FaultName, FaultSpec

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
ROUTES = ("upgrade", "proxy_version", "job", "immediate_jobs", "instances", "proxies")
DEFAULT_EPOCH = 1_700_000_000.0
GATEWAY_PAGE = b"<html><head><title>%d</title></head><body><h1>%d %s</h1><hr>gateway</body></html>"
_DEFAULT_FAULTS = FaultSpec()
_REASONS = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}


def loop_clock(epoch: float = DEFAULT_EPOCH) -> Clock:
    """Epoch seconds that follow the running event loop's time (virtual on a virtual-time loop).

    Call the result only inside a running loop (raises ``RuntimeError`` otherwise)."""

    def now() -> float:
        return epoch + asyncio.get_running_loop().time()

    return now


class FaultKind(enum.StrEnum):
    """What an injected ``Fault`` does to one call (the table in the module docstring; ``PASS``: the
    call is answered normally, after any delay)."""

    PASS = "pass"
    LOST = "lost"
    HTTP = "http"
    GATEWAY = "gateway"
    NULL_WORKFLOW_ID = "null_workflow_id"
    LOWER_CASE_STATE = "lower_case_state"
    RAW = "raw"


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault; build it with the class methods. ``applied``: whether the fleet acts."""

    kind: FaultKind
    applied: bool = True
    status: int = 0
    error_code: str | None = None
    error_msg: str | None = None
    retry_after: float | None = None
    body: bytes = b""
    content_type: str = "application/json"
    timeout: bool = False
    delay_s: float = 0.0
    answer_delay_s: float = 0.0

    @classmethod
    def lost(cls, *, applied: bool = True, timeout: bool = False) -> Fault:
        """The answer never arrives: RESET (or TIMEOUT after ``timeout_s``), sent=True."""
        return cls(FaultKind.LOST, applied=applied, timeout=timeout)

    @classmethod
    def http(
        cls,
        status: int,
        error_code: str | None = None,
        error_msg: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> Fault:
        """An HTTP error answer with the contract's error body; the fleet does nothing."""
        return cls(
            FaultKind.HTTP,
            applied=False,
            status=status,
            error_code=error_code or f"DBS.{status}000",
            error_msg=error_msg or f"injected HTTP {status}",
            retry_after=retry_after,
        )

    @classmethod
    def gateway(cls, status: int = 502, *, applied: bool = True) -> Fault:
        """A gateway error page (HTML) after the fleet acted: what a proxy in front does on a timeout."""
        return cls(FaultKind.GATEWAY, applied=applied, status=status)

    @classmethod
    def null_workflow_id(cls) -> Fault:
        """The fleet acts; every ACCEPT item's ``workflow_id`` is replaced by null."""
        return cls(FaultKind.NULL_WORKFLOW_ID)

    @classmethod
    def lower_case_state(cls) -> Fault:
        """The fleet acts; every item's ``state`` is lower-cased."""
        return cls(FaultKind.LOWER_CASE_STATE)

    @classmethod
    def raw(
        cls, status: int, body: bytes, *, applied: bool = True, content_type: str = "application/json"
    ) -> Fault:
        """Answer exactly these bytes with this status."""
        return cls(FaultKind.RAW, applied=applied, status=status, body=body, content_type=content_type)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait ``seconds`` (on ``sleep``) before the fleet acts; the answer is the fleet's."""
        return cls(FaultKind.PASS, delay_s=seconds)

    def with_delay(self, delay_s: float = 0.0, answer_delay_s: float = 0.0) -> Fault:
        """The same fault, with waits before the fleet acts and before the answer arrives."""
        return replace(self, delay_s=delay_s, answer_delay_s=answer_delay_s)


@dataclass(slots=True)
class _Wire:
    """What the fake's wire carried back: an answer (status, headers, body) or a transport failure."""

    status: int | str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    failure: TransportFailure | None = None


class FakeCloud:
    """A ``CloudApi`` over ``fleet`` (see the module docstring).

    ``local_clock``: our wall clock as the caller sees it (default: the fleet's; give a skewed one to
    test clock offsets); ``timeout_s``: how long a lost answer with ``timeout=True`` and a hung
    scripted fault take before TIMEOUT; ``injector``: the scenario's seeded fault draws, as the
    simulator's gateway makes them (None: no drawn faults); ``sleep``: how delays wait."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        local_clock: Clock | None = None,
        timeout_s: float = 30.0,
        injector: FaultInjector | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.fleet = fleet
        self.clock = CloudClock(local=local_clock or fleet.clock)
        self.timeout_s = timeout_s
        self.injector = injector
        self._sleep = sleep
        self._queues: dict[tuple[str, str | None], deque[Fault]] = {}
        self.log: list[dict[str, Any]] = []
        self.not_sent: list[dict[str, Any]] = []
        self._seq = 0

    # ------------------------------------------------------------------------------------ faults
    def inject(self, route: str, *faults: Fault, proxy_id: str | None = None) -> None:
        """Queue ``faults`` for the next calls of ``route`` (of ``proxy_id`` only, when given)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {', '.join(ROUTES)}")
        self._queues.setdefault((route, proxy_id), deque()).extend(faults)

    def pending_faults(self) -> int:
        """Injected faults not used yet (a test can assert its faults were all met)."""
        return sum(len(q) for q in self._queues.values())

    def _next_fault(self, route: str, proxy_id: str | None) -> Fault | None:
        for key in ((route, proxy_id), (route, None)) if proxy_id else ((route, None),):
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
        return None

    # ------------------------------------------------------------------------------------- calls
    async def upgrade(
        self,
        ref: ProxyRef,
        source_version: str,
        target_version: str,
        *,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> Answered | Failure:
        """As ``CloudClient.upgrade``, answered by ``Fleet.upgrade``."""
        body = {"source_version": source_version, "target_version": target_version}
        record: dict[str, Any] = {
            "source_version": source_version,
            "target_version": target_version,
            "effect": "none",
        }

        def act(record: dict[str, Any]) -> tuple[Reply | None, FaultName | None]:
            answer = self.fleet.upgrade(ref.project_id, ref.instance_id, ref.proxy_id, body)
            record.update(
                effect=answer.effect,
                workflows=list(answer.workflows),
                items=list(answer.items),
                workflow_id=answer.workflows[0] if answer.workflows else None,
                script_step=answer.script_step,
            )
            return answer.reply, answer.fault

        wire = await self._exchange("upgrade", ref, act, record, on_sent, may_send)
        if isinstance(wire, TransportFailure):
            return wire
        return upgrade_outcome(*wire, instance_id=ref.instance_id)

    async def proxy_version(
        self, ref: ProxyRef, *, on_sent: OnSent = None, may_send: MaySend = None
    ) -> VersionInfo | Failure:
        """As ``CloudClient.proxy_version``, answered by ``Fleet.proxy_version``."""

        def act(_record: dict[str, Any]) -> tuple[Reply | None, FaultName | None]:
            return self.fleet.proxy_version(ref.project_id, ref.instance_id, ref.proxy_id), None

        wire = await self._exchange("proxy_version", ref, act, {}, on_sent, may_send)
        return wire if isinstance(wire, TransportFailure) else version_outcome(*wire)

    async def job(
        self, ref: AnyRef, workflow_id: str, *, on_sent: OnSent = None, may_send: MaySend = None
    ) -> WorkflowInfo | Failure:
        """As ``CloudClient.job``, answered by ``Fleet.job``."""

        def act(_record: dict[str, Any]) -> tuple[Reply | None, FaultName | None]:
            return self.fleet.job(ref.project_id, workflow_id), None

        wire = await self._exchange("job", ref, act, {"workflow_id": workflow_id}, on_sent, may_send)
        return wire if isinstance(wire, TransportFailure) else job_outcome(*wire, workflow_id=workflow_id)

    async def immediate_jobs(
        self,
        ref: AnyRef,
        *,
        start_time: datetime,
        end_time: datetime | None = None,
        offset: int = 0,
        limit: int = 50,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> RecentJobs | Failure:
        """As ``CloudClient.immediate_jobs`` (same query strings), answered by ``Fleet.immediate_jobs``."""
        query = {"offset": str(offset), "limit": str(limit), "start_time": _utc(start_time)}
        if end_time is not None:
            query["end_time"] = _utc(end_time)

        def act(_record: dict[str, Any]) -> tuple[Reply | None, FaultName | None]:
            return self.fleet.immediate_jobs(ref.project_id, query), None

        wire = await self._exchange("immediate_jobs", ref, act, {}, on_sent, may_send)
        return wire if isinstance(wire, TransportFailure) else recent_jobs_outcome(*wire)

    async def list_instances(
        self,
        ref: AnyRef,
        *,
        offset: int = 0,
        limit: int = 100,
        name: str | None = None,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> InstancePage | Failure:
        """As ``CloudClient.list_instances``, answered by ``Fleet.list_instances``."""
        query = {"offset": str(offset), "limit": str(limit)}
        if name is not None:
            query["name"] = name

        def act(_record: dict[str, Any]) -> tuple[Reply | None, FaultName | None]:
            return self.fleet.list_instances(ref.project_id, query), None

        wire = await self._exchange("instances", ref, act, {}, on_sent, may_send)
        return wire if isinstance(wire, TransportFailure) else instances_outcome(*wire)

    async def list_proxies(
        self,
        ref: InstanceRef | ProxyRef,
        *,
        offset: int = 0,
        limit: int = 100,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> ProxyPage | Failure:
        """As ``CloudClient.list_proxies``, answered by ``Fleet.list_proxies``."""
        query = {"offset": str(offset), "limit": str(limit)}

        def act(_record: dict[str, Any]) -> tuple[Reply | None, FaultName | None]:
            return self.fleet.list_proxies(ref.project_id, ref.instance_id, query), None

        wire = await self._exchange("proxies", ref, act, {}, on_sent, may_send)
        return wire if isinstance(wire, TransportFailure) else proxies_outcome(*wire)

    # ---------------------------------------------------------------------------------- the wire
    async def _exchange(
        self,
        route: str,
        ref: AnyRef,
        act: Callable[[dict[str, Any]], tuple[Reply | None, FaultName | None]],
        extra: dict[str, Any],
        on_sent: OnSent,
        may_send: MaySend,
    ) -> tuple[int, Mapping[str, str], bytes] | TransportFailure:
        proxy_id = getattr(ref, "proxy_id", None)
        instance_id = getattr(ref, "instance_id", None)
        record: dict[str, Any] = {
            "seq": 0,
            "route": route,
            "project_id": ref.project_id,
            "instance_id": instance_id,
            "proxy_id": proxy_id,
            "workflow_id": None,
            "received_at": None,
            "answered_at": None,
            "http_status": None,
            "error_code": None,
            "fault": None,
            "effect": None,
            "request_id": uuid.uuid4().hex,
        }
        record.update(extra)
        if may_send is not None and not may_send():
            record["http_status"] = "not_sent"
            self.not_sent.append(record)
            return TransportFailure(TransportKind.CONNECT, sent=False, detail=NOT_SENT)
        sent_at = self.clock.now()
        if on_sent is not None:
            on_sent()
        fault = self._next_fault(route, proxy_id)
        if fault is not None and fault.delay_s > 0:
            await self._sleep(fault.delay_s)
        self._seq += 1
        record["seq"] = self._seq
        record["received_at"] = self.fleet.clock()
        wire = await self._perform(route, fault, act, record)
        if fault is not None and fault.answer_delay_s > 0:
            await self._sleep(fault.answer_delay_s)
        record["answered_at"] = self.fleet.clock()
        record["http_status"] = wire.status
        self.log.append(record)
        if wire.failure is not None:
            return wire.failure
        assert isinstance(wire.status, int)
        self.clock.record(wire.headers.get("Date"), sent_at=sent_at, received_at=self.clock.now())
        return wire.status, wire.headers, wire.body

    async def _perform(
        self,
        route: str,
        fault: Fault | None,
        act: Callable[[dict[str, Any]], tuple[Reply | None, FaultName | None]],
        record: dict[str, Any],
    ) -> _Wire:
        if fault is not None and fault.kind is not FaultKind.PASS:
            record["fault"] = f"injected:{fault.kind.value}"
            reply: Reply | None = None
            if fault.applied:
                reply, _ = act(record)  # the scenario's own scripted fault is overridden by the injected one
            return await self._injected(fault, reply, record)
        drawn = self.injector.draw(route) if self.injector is not None else None
        if drawn is not None:
            record["fault"] = drawn.kind
            if drawn.kind == "slow":
                await self._sleep(self.fault_spec.slow_s)
            elif drawn.kind in BEFORE:
                return await self._sim_fault(drawn, record)
        reply, scripted = act(record)
        if scripted is not None:  # a scripted fault wins over a drawn one, as in the simulator
            record["fault"] = scripted
            if scripted == "slow":
                await self._sleep(self.fault_spec.slow_s)
            else:
                return await self._sim_fault(SimFault(scripted, 0), record)
        elif drawn is not None and drawn.kind in AFTER:
            return await self._sim_fault(drawn, record)
        assert reply is not None  # only a scripted fault answers nothing
        return self._wire(reply, record)

    async def _injected(self, fault: Fault, reply: Reply | None, record: dict[str, Any]) -> _Wire:
        if fault.kind is FaultKind.LOST:
            if fault.timeout:
                await self._sleep(self.timeout_s)
                detail = "fake: no answer within the timeout"
                return _Wire(
                    "hang", failure=TransportFailure(TransportKind.TIMEOUT, sent=True, detail=detail)
                )
            detail = "fake: connection reset before the answer"
            return _Wire("reset", failure=TransportFailure(TransportKind.RESET, sent=True, detail=detail))
        if fault.kind is FaultKind.HTTP:
            err = error_reply(fault.status, fault.error_code or "", fault.error_msg or "")
            if fault.retry_after is not None:
                err.headers["Retry-After"] = f"{fault.retry_after:g}"
            return self._wire(err, record)
        if fault.kind is FaultKind.GATEWAY:
            reason = _REASONS.get(fault.status, "Error").encode()
            page = GATEWAY_PAGE % (fault.status, fault.status, reason)
            return self._wire(Reply(fault.status, None, {"Content-Type": "text/html"}, raw=page), record)
        if fault.kind is FaultKind.RAW:
            return self._wire(
                Reply(fault.status, None, {"Content-Type": fault.content_type}, raw=fault.body), record
            )
        if reply is None:  # a rewrite of an answer that the scenario's script dropped: nothing to rewrite
            return _Wire(
                "reset", failure=TransportFailure(TransportKind.RESET, sent=True, detail="fake: dropped")
            )
        rewritten = copy.deepcopy(reply)
        items = rewritten.body.get("update_result") if isinstance(rewritten.body, dict) else None
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            if fault.kind is FaultKind.NULL_WORKFLOW_ID and item.get("state") == "ACCEPT":
                item["workflow_id"] = None
            elif fault.kind is FaultKind.LOWER_CASE_STATE and isinstance(item.get("state"), str):
                item["state"] = item["state"].lower()
        return self._wire(rewritten, record)

    @property
    def fault_spec(self) -> FaultSpec:
        """The injector's fault settings (slow_s, hang_s, Retry-After...), or the scenario defaults."""
        return self.injector.spec if self.injector is not None else _DEFAULT_FAULTS

    async def _sim_fault(self, fault: SimFault, record: dict[str, Any]) -> _Wire:
        """A simulator fault kind performed as the simulator's HTTP layer performs it (for the *_after
        kinds the fleet has already acted)."""
        detail = f"fake: {fault.kind}"
        if fault.kind in RESETS:
            return _Wire("reset", failure=TransportFailure(TransportKind.RESET, sent=True, detail=detail))
        if fault.kind in HANGS:
            # the client gives up at its timeout; the simulator would hang hang_s, then drop
            await self._sleep(min(self.timeout_s, self.fault_spec.hang_s))
            kind = TransportKind.TIMEOUT if self.fault_spec.hang_s >= self.timeout_s else TransportKind.RESET
            return _Wire("hang", failure=TransportFailure(kind, sent=True, detail=detail))
        if fault.kind in MALFORMED:
            return self._wire(malformed_reply(fault), record)
        error = fault_reply(fault, self.fault_spec)
        if error is None:  # pragma: no cover - every kind is handled above
            raise AssertionError(fault.kind)
        return self._wire(error, record)

    def _wire(self, reply: Reply, record: dict[str, Any]) -> _Wire:
        headers = {
            **reply.headers,
            "X-Request-Id": str(record.get("request_id") or uuid.uuid4().hex),
            "Date": formatdate(self.fleet.clock(), usegmt=True),
        }
        if reply.raw is not None:
            body = reply.raw
        else:
            headers.setdefault("Content-Type", "application/json;charset=UTF-8")
            body = json.dumps(reply.body).encode()
        if record:
            record["error_code"] = reply.error_code
        return _Wire(reply.status, headers, body)


def _utc(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
