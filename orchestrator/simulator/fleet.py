"""The simulated cloud's state: proxies, their versions, and the workflows that upgrade them.

No I/O here: every method takes its inputs as plain values and returns a ``Reply`` (status + JSON body),
and time comes from an injectable clock, so hours of workflow timing can be tested in microseconds. The
aiohttp layer (``app.py``) only translates HTTP to these calls. Workflows are evaluated lazily: a
workflow's status is a function of the clock, and ``settle`` applies the effect of the ones that ended
(the proxy's version changes only when its workflows have completed).
"""

from __future__ import annotations

import calendar
import hashlib
import heapq
import json
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError

from orchestrator.simulator.scenario import (
    VERSION_PATTERN,
    FaultName,
    ProxySpec,
    Scenario,
    ScriptStep,
    WorkflowOutcome,
    WorkflowSpec,
    version_key,
)

Clock = Callable[[], float]
_M = TypeVar("_M", WorkflowSpec, ProxySpec)
JOB_NAME = "Upgrade proxy version"
BUSY_MSG = "Another operation is running on the instance. Try again later."
_VERSION_RE = re.compile(VERSION_PATTERN)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S+0000"
_QUERY_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_AFTER_OR_SLOW = frozenset({"timeout_after", "reset_after", "malformed_after", "slow"})


@dataclass(slots=True)
class Reply:
    """An HTTP answer as values; ``raw`` (bytes) replaces the JSON body when set."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None

    @property
    def error_code(self) -> str | None:
        """The body's ``error_code`` when it is the contract's error shape, else None."""
        if isinstance(self.body, dict):
            code = self.body.get("error_code")
            return code if isinstance(code, str) else None
        return None


def error_reply(status: int, code: str, msg: str) -> Reply:
    """An error answer in the contract's shape: ``{"error_code", "error_msg"}`` (docs/api-contract.md,
    Common: errors)."""
    return Reply(status, {"error_code": code, "error_msg": msg})


class BadRequest(Exception):
    """A request the simulated cloud refuses; ``reply`` is the error answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body)
        self.reply = reply


def _param_error(msg: str) -> BadRequest:
    return BadRequest(error_reply(400, "DBS.200001", f"Parameter error: {msg}"))


def format_time(t: float) -> str:
    """Epoch seconds as the simulated API writes times (``2026-12-05T01:00:03+0000``, UTC)."""
    return time.strftime(_TIME_FORMAT, time.gmtime(t))


@dataclass(slots=True)
class CallGroup:
    """The workflows one accepted upgrade call created; the version moves when all of them complete."""

    proxy: ProxyState
    target: str
    all_accepted: bool
    size: int
    completed: int = 0


@dataclass(slots=True, eq=False)
class Workflow:
    """One upgrade workflow (one node of a proxy): ``Pending`` for ``pending_s``, ``Running`` for
    ``running_s``, then its ``outcome`` (``hang``: never ends); visible to ``jobs?id=`` and
    ``immediate-jobs`` ``visible_after_s`` after creation. Times are the fleet clock's epoch seconds."""

    id: str
    seq: int
    proxy: ProxyState
    node: int
    source_version: str
    target_version: str
    created_at: float
    pending_s: float  # real seconds, fixed at creation (a later patch of the timings does not apply)
    running_s: float
    visible_after_s: float
    outcome: WorkflowOutcome
    fail_reason: str
    group: CallGroup
    settled: bool = False

    @property
    def natural_end(self) -> float:
        """When it would end by its timings (even a hanging one)."""
        return self.created_at + self.pending_s + self.running_s

    @property
    def ends_at(self) -> float:
        """When it ends: ``natural_end``, or infinity for a hanging one."""
        return math.inf if self.outcome == "hang" else self.natural_end

    def visible(self, now: float) -> bool:
        """Whether the job APIs know it at ``now`` (before that: 400 ``DBS.200543``, as a new job)."""
        return now >= self.created_at + self.visible_after_s

    def status(self, now: float) -> tuple[str, str]:
        """(status, process) at ``now``."""
        elapsed = now - self.created_at
        if elapsed < self.pending_s:
            return "Pending", "0%"
        if now < self.ends_at:
            run = elapsed - self.pending_s
            share = run / self.running_s if self.running_s > 0 else 1.0
            return "Running", f"{max(1, min(99, int(share * 100)))}%"
        if self.outcome == "fail":
            return "Failed", "100%"
        return "Completed", "100%"

    def ended_at(self, now: float) -> float | None:
        """When it ended, or None while it has not at ``now``."""
        return self.ends_at if now >= self.ends_at else None


@dataclass(slots=True, eq=False)
class InstanceState:
    """One simulated instance: its proxies, and its unsettled workflows (while any runs, an upgrade call
    on any of its proxies gets 409 busy)."""

    id: str
    name: str
    status: str
    proxies: dict[str, ProxyState] = field(default_factory=dict)
    active: set[Workflow] = field(default_factory=set)  # unsettled workflows: the instance is busy


@dataclass(slots=True, eq=False)
class ProxyState:
    """One simulated proxy: its versions now, its position in the scenario's script, and counts of the
    upgrade calls it got and accepted."""

    spec: ProxySpec
    instance: InstanceState
    current_version: str
    latest_version: str
    script_pos: int = 0
    upgrade_calls: int = 0
    accepted_calls: int = 0
    workflows: list[Workflow] = field(default_factory=list)

    def next_step(self) -> ScriptStep | None:
        """The script step the next upgrade call meets, or None when the script is used up."""
        script = self.spec.script
        return script[self.script_pos] if self.script_pos < len(script) else None


@dataclass(frozen=True, slots=True)
class UpgradeAnswer:
    """What an upgrade call did. ``reply`` is None only for a scripted fault that answers nothing."""

    reply: Reply | None
    effect: str = "none"  # "applied" when at least one workflow was created
    workflows: tuple[str, ...] = ()
    items: tuple[dict[str, Any], ...] = ()
    fault: FaultName | None = None  # a scripted fault the app must perform
    script_step: int | None = None


class Fleet:
    """The simulated cloud of one project, built from a ``Scenario``; ``clock`` gives epoch seconds
    (``time.time``, or a virtual clock). Each API method answers as the contract's route does
    (docs/api-contract.md) and never raises for a bad request: it returns the error ``Reply``."""

    def __init__(self, scenario: Scenario, clock: Clock = time.time) -> None:
        self.project_id = scenario.project_id
        self.speed = scenario.speed
        self.workflow_spec = scenario.workflow
        self.default_current = scenario.current_version
        self.default_latest = scenario.latest_version
        self.clock = clock
        self.instances: dict[str, InstanceState] = {}
        self.proxies: dict[str, ProxyState] = {}
        self.workflows: dict[str, Workflow] = {}
        self._ending: list[tuple[float, int, Workflow]] = []
        self._id_rng = random.Random(f"{scenario.seed}:workflow-ids")
        self._outcome_rng = random.Random(f"{scenario.seed}:workflow-outcomes")
        self._seq = 0
        for inst_spec in scenario.all_instances():
            inst = InstanceState(inst_spec.id, inst_spec.name or inst_spec.id, inst_spec.status)
            self.instances[inst.id] = inst
            for spec in inst_spec.proxies:
                proxy = ProxyState(
                    spec=spec,
                    instance=inst,
                    current_version=spec.current_version or scenario.current_version,
                    latest_version=spec.latest_version or scenario.latest_version,
                )
                inst.proxies[spec.id] = proxy
                self.proxies[spec.id] = proxy

    # -- time ---------------------------------------------------------------------------------------

    def settle(self, now: float | None = None) -> float:
        """Apply the effect of every workflow that has ended by ``now``; returns ``now``."""
        now = self.clock() if now is None else now
        while self._ending and self._ending[0][0] <= now:
            ends_at, _, wf = heapq.heappop(self._ending)
            if wf.settled or ends_at != wf.ends_at:
                continue  # stale entry (its outcome was patched)
            wf.settled = True
            wf.proxy.instance.active.discard(wf)
            if wf.outcome == "complete":
                group = wf.group
                group.completed += 1
                if group.all_accepted and group.completed == group.size:
                    group.proxy.current_version = group.target
        return now

    def _schedule(self, wf: Workflow) -> None:
        if wf.ends_at != math.inf:
            heapq.heappush(self._ending, (wf.ends_at, wf.seq, wf))

    # -- lookups ------------------------------------------------------------------------------------

    def _instance(self, project_id: str, instance_id: str) -> InstanceState:
        inst = self.instances.get(instance_id) if project_id == self.project_id else None
        if inst is None:
            raise BadRequest(error_reply(404, "DBS.200002", "The DB instance does not exist."))
        return inst

    def _proxy(self, project_id: str, instance_id: str, proxy_id: str) -> ProxyState:
        proxy = self._instance(project_id, instance_id).proxies.get(proxy_id)
        if proxy is None:
            raise BadRequest(error_reply(400, "DBS.270024", "The proxy does not exist."))
        return proxy

    # -- the upgrade call ---------------------------------------------------------------------------

    def upgrade(self, project_id: str, instance_id: str, proxy_id: str, body: Any) -> UpgradeAnswer:
        """The validation order is the contract's: existence, parameters, busy, versions, verdicts."""
        now = self.settle()
        try:
            proxy = self._proxy(project_id, instance_id, proxy_id)
        except BadRequest as exc:
            return UpgradeAnswer(exc.reply)
        proxy.upgrade_calls += 1
        try:
            source, target = _parse_upgrade_body(body)
        except BadRequest as exc:
            return UpgradeAnswer(exc.reply)
        scripted_fault: FaultName | None = None
        step_index: int | None = None
        step = proxy.next_step()
        if step is not None and (step.http is not None or step.fault is not None):
            step_index, proxy.script_pos = proxy.script_pos, proxy.script_pos + 1
            if step.http is not None:
                code, msg = _default_error(step.http)
                reply = error_reply(step.http, step.error_code or code, step.error_msg or msg)
                return UpgradeAnswer(reply, script_step=step_index)
            if step.fault not in _AFTER_OR_SLOW:
                return UpgradeAnswer(None, fault=step.fault, script_step=step_index)
            scripted_fault = step.fault
        refusal = self._refusal(proxy, source, target)
        if refusal is not None:
            return UpgradeAnswer(refusal, fault=scripted_fault, script_step=step_index)
        step = proxy.next_step()
        if step is not None:  # an accept/reject step: consumed only by a call that reaches the verdict
            step_index, proxy.script_pos = proxy.script_pos, proxy.script_pos + 1
        return self._verdicts(proxy, source, target, step, now, scripted_fault, step_index)

    def _refusal(self, proxy: ProxyState, source: str, target: str) -> Reply | None:
        if proxy.instance.active:
            return error_reply(409, "DBS.200019", BUSY_MSG)
        current = proxy.current_version
        if current == target:
            return error_reply(
                400, "DBS.05000008", f"The proxy already runs version {current}: no update is needed."
            )
        if source != current:
            return error_reply(
                400,
                "DBS.05000001",
                f"Kernel version mismatch: the proxy runs {current}, not source_version {source}.",
            )
        if version_key(target) > version_key(proxy.latest_version):
            return error_reply(
                400,
                "DBS.200001",
                f"Parameter error: target_version {target} is newer than the latest version "
                f"{proxy.latest_version}.",
            )
        return None

    def _verdicts(
        self,
        proxy: ProxyState,
        source: str,
        target: str,
        step: ScriptStep | None,
        now: float,
        scripted_fault: FaultName | None,
        step_index: int | None,
    ) -> UpgradeAnswer:
        spec = proxy.spec
        if step is not None:
            message, rejecting = step.reject, step.reject_nodes
        else:
            message, rejecting = spec.reject, spec.reject_nodes
        rejected_nodes = (
            set() if message is None else set(range(spec.nodes) if rejecting is None else rejecting)
        )
        group = CallGroup(
            proxy, target, all_accepted=not rejected_nodes, size=spec.nodes - len(rejected_nodes)
        )
        items: list[dict[str, Any]] = []
        log_items: list[dict[str, Any]] = []
        created: list[str] = []
        for node in range(spec.nodes):
            wid = str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))
            accept = node not in rejected_nodes
            item: dict[str, Any] = {} if spec.omit_instance_id else {"instance_id": proxy.instance.id}
            item.update(workflow_id=wid, state="ACCEPT" if accept else "REJECT")
            item["error_message"] = None if accept else message
            items.append(item)
            log_items.append({"node": node, "workflow_id": wid, "state": item["state"]})
            if accept:
                self._start_workflow(proxy, node, wid, source, target, now, group)
                created.append(wid)
        if created:
            proxy.accepted_calls += 1
        return UpgradeAnswer(
            Reply(200, {"update_result": items}),
            effect="applied" if created else "none",
            workflows=tuple(created),
            items=tuple(log_items),
            fault=scripted_fault,
            script_step=step_index,
        )

    def _start_workflow(
        self, proxy: ProxyState, node: int, wid: str, source: str, target: str, now: float, group: CallGroup
    ) -> None:
        spec, timing = proxy.spec, self.workflow_spec
        draw = self._outcome_rng.random()  # drawn for every workflow so a per-proxy override keeps order
        outcome: WorkflowOutcome = spec.workflow or _draw_outcome(draw, timing)
        self._seq += 1
        wf = Workflow(
            id=wid,
            seq=self._seq,
            proxy=proxy,
            node=node,
            source_version=source,
            target_version=target,
            created_at=now,
            pending_s=timing.pending_s / self.speed,
            running_s=timing.running_s / self.speed,
            visible_after_s=timing.job_visible_after_s / self.speed,
            outcome=outcome,
            fail_reason=spec.fail_reason or timing.fail_reason,
            group=group,
        )
        self.workflows[wid] = wf
        proxy.workflows.append(wf)
        proxy.instance.active.add(wf)
        self._schedule(wf)

    # -- reads --------------------------------------------------------------------------------------

    def proxy_version(self, project_id: str, instance_id: str, proxy_id: str) -> Reply:
        """``GET .../proxy-version`` (contract section 2): current and latest version, ``can_upgrade``
        (the scenario's, else current < latest) and a ``risk`` block whose ``upgrade_duration`` is this
        fleet's workflow time. 404/400 for an unknown instance or proxy."""
        self.settle()
        try:
            proxy = self._proxy(project_id, instance_id, proxy_id)
        except BadRequest as exc:
            return exc.reply
        current, latest = proxy.current_version, proxy.latest_version
        can = proxy.spec.can_upgrade
        return Reply(
            200,
            {
                "current_version": current,
                "latest_version": latest,
                "can_upgrade": can if can is not None else version_key(current) < version_key(latest),
                "risk": {
                    "level": "medium",
                    "suggest": "Upgrade during off-peak hours.",
                    "influence": "Connections through the proxy are interrupted briefly while it restarts.",
                    "guidance": "Make sure your application reconnects automatically.",
                    "service_impact_duration": "about 10 seconds per node",
                    "upgrade_duration": self._upgrade_duration(),
                },
            },
        )

    def _upgrade_duration(self) -> str:
        """How long this cloud's upgrade workflows take, as the API words it: the scenario's Pending plus
        Running time in real seconds (``speed`` applied), so ``plan`` can size a rehearsal of the window."""
        seconds = (self.workflow_spec.pending_s + self.workflow_spec.running_s) / self.speed
        if seconds < 90:
            n = max(1, round(seconds))
            return f"about {n} second{'' if n == 1 else 's'}"
        return f"about {round(seconds / 60)} minutes"

    def list_proxies(self, project_id: str, instance_id: str, query: Mapping[str, str]) -> Reply:
        """``GET .../instances/{id}/proxies`` (contract section 3): one page (``offset``, ``limit``
        1-100, default 100) of ``proxy_list``; 400 for a bad parameter, 404 for an unknown instance."""
        self.settle()
        try:
            inst = self._instance(project_id, instance_id)
            offset = _int_param(query, "offset", 0, 0, 1 << 31)
            limit = _int_param(query, "limit", 100, 1, 100)
        except BadRequest as exc:
            return exc.reply
        page = list(inst.proxies.values())[offset : offset + limit]
        return Reply(200, {"proxy_list": [_proxy_entry(p) for p in page]})

    def list_instances(self, project_id: str, query: Mapping[str, str]) -> Reply:
        """``GET /instances`` (contract section 4): one page (``offset``, ``limit`` 1-100) filtered by
        ``id``, ``name`` (substring) and ``datastore_type``, with ``total_count``; 400 for a bad
        parameter."""
        try:
            offset = _int_param(query, "offset", 0, 0, 1 << 31)
            limit = _int_param(query, "limit", 100, 1, 100)
        except BadRequest as exc:
            return exc.reply
        found = list(self.instances.values()) if project_id == self.project_id else []
        if "id" in query:
            found = [i for i in found if i.id == query["id"]]
        if "name" in query:
            found = [i for i in found if query["name"] in i.name]
        if query.get("datastore_type", "gaussdb-mysql") != "gaussdb-mysql":
            found = []
        page = found[offset : offset + limit]
        return Reply(200, {"instances": [_instance_entry(i) for i in page], "total_count": len(found)})

    def job(self, project_id: str, workflow_id: str | None) -> Reply:
        """``GET /jobs?id=`` (contract section 5): the workflow's status, progress and times; 400
        ``DBS.200543`` for an unknown id or one not visible yet."""
        now = self.settle()
        wf = self.workflows.get(workflow_id or "")
        if wf is None or project_id != self.project_id or not wf.visible(now):
            return error_reply(400, "DBS.200543", "The job does not exist.")
        status, process = wf.status(now)
        ended = wf.ended_at(now)
        inst = wf.proxy.instance
        return Reply(
            200,
            {
                "job": {
                    "id": wf.id,
                    "name": JOB_NAME,
                    "status": status,
                    "created": format_time(wf.created_at),
                    "ended": format_time(ended) if ended is not None else None,
                    "process": process,
                    "instance": {"id": inst.id, "name": inst.name},
                    "entities": _entities(wf),
                    "fail_reason": wf.fail_reason if status == "Failed" else None,
                }
            },
        )

    def immediate_jobs(self, project_id: str, query: Mapping[str, str]) -> Reply:
        """``GET /immediate-jobs`` (contract section 6): visible workflows newest first, filtered by
        ``start_time``/``end_time`` (``yyyy-mm-ddThh:mm:ssZ``, on creation time), ``status``,
        ``job_id`` and ``job_name``; ``limit`` 10, 20 or 50 (default 10), with ``total_count``. 400 for a
        bad parameter."""
        now = self.settle()
        try:
            offset = _int_param(query, "offset", 0, 0, 1 << 31)
            limit = _int_param(query, "limit", 10, 1, 50)
            if limit not in (10, 20, 50):
                raise _param_error("limit must be 10, 20 or 50")
            start = _time_param(query, "start_time")
            end = _time_param(query, "end_time")
        except BadRequest as exc:
            return exc.reply
        matched: list[Workflow] = []
        if project_id == self.project_id and query.get("job_name", JOB_NAME) in ("", JOB_NAME):
            wanted_status = (query.get("status") or "").lower()
            wanted_id = query.get("job_id")
            for wf in reversed(self.workflows.values()):  # creation order reversed: newest first
                created_s = int(wf.created_at)
                if not wf.visible(now) or (wanted_id and wf.id != wanted_id):
                    continue
                if (start is not None and created_s < start) or (end is not None and created_s > end):
                    continue
                if wanted_status and wf.status(now)[0].lower() != wanted_status:
                    continue
                matched.append(wf)
        return Reply(
            200,
            {
                "jobs": [_immediate_row(wf, now) for wf in matched[offset : offset + limit]],
                "total_count": len(matched),
                "action_names": [JOB_NAME],
            },
        )

    # -- simulator-only -----------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Every proxy's state (``proxy_state`` plus its project, instance and proxy ids), settled at
        the clock's now: what tests and the demo compare a run with."""
        now = self.settle()
        return [
            {
                "project_id": self.project_id,
                "instance_id": proxy.instance.id,
                "proxy_id": proxy.spec.id,
                **self.proxy_state(proxy, now),
            }
            for proxy in self.proxies.values()
        ]

    def proxy_state(self, proxy: ProxyState, now: float) -> dict[str, Any]:
        """One proxy as JSON-ready values: versions, node count, scripted rejection and what is left of
        the script, call counts, and each workflow's status at ``now``."""
        return {
            "current_version": proxy.current_version,
            "latest_version": proxy.latest_version,
            "nodes": proxy.spec.nodes,
            "reject": proxy.spec.reject,
            "script_remaining": len(proxy.spec.script) - proxy.script_pos,
            "upgrade_calls": proxy.upgrade_calls,
            "accepted_calls": proxy.accepted_calls,
            "workflows": [
                {
                    "id": wf.id,
                    "status": wf.status(now)[0],
                    "node": wf.node,
                    "target_version": wf.target_version,
                    "created_at": wf.created_at,
                    "ended_at": wf.ended_at(now),
                }
                for wf in proxy.workflows
            ],
        }

    def patch(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Change proxies (settings apply to later calls), workflow timings, or force hung workflows
        to end; returns the state of what was touched. Raises BadRequest on an invalid patch."""
        now = self.settle()
        result: dict[str, Any] = {}
        if "workflow" in data:
            merged = {**self.workflow_spec.model_dump(), **_mapping(data["workflow"], "workflow")}
            self.workflow_spec = _validated(WorkflowSpec, merged, "workflow")
            result["workflow"] = self.workflow_spec.model_dump()
        for proxy_id, changes in _mapping(data.get("proxies", {}), "proxies").items():
            proxy = self.proxies.get(proxy_id)
            if proxy is None:
                raise _param_error(f"unknown proxy {proxy_id}")
            changes = _mapping(changes, f"proxies.{proxy_id}")
            merged = {**proxy.spec.model_dump(exclude={"script"}), **changes, "id": proxy.spec.id}
            merged.setdefault("script", [s.model_dump(exclude_none=True) for s in proxy.spec.script])
            proxy.spec = _validated(ProxySpec, merged, f"proxies.{proxy_id}")
            if "script" in changes:
                proxy.script_pos = 0
            if changes.get("current_version"):
                proxy.current_version = proxy.spec.current_version or proxy.current_version
            if changes.get("latest_version"):
                proxy.latest_version = proxy.spec.latest_version or proxy.latest_version
            result.setdefault("proxies", {})[proxy_id] = self.proxy_state(proxy, now)
        for wid, changes in _mapping(data.get("workflows", {}), "workflows").items():
            wf = self.workflows.get(wid)
            outcome = _mapping(changes, f"workflows.{wid}").get("outcome")
            if wf is None or wf.settled:
                raise _param_error(f"no running workflow {wid}")
            if outcome not in ("complete", "fail", "no_version_change", "hang"):
                raise _param_error("workflow outcome must be complete, fail, no_version_change or hang")
            wf.outcome = outcome
            if outcome != "hang" and wf.natural_end < now:  # a hung workflow ends now, not in the past
                wf.running_s = now - wf.created_at - wf.pending_s
            self._schedule(wf)
            result.setdefault("workflows", {})[wid] = {"outcome": outcome}
        self.settle(now)
        return result


# -- pure helpers ---------------------------------------------------------------------------------------


def _draw_outcome(draw: float, spec: WorkflowSpec) -> WorkflowOutcome:
    if draw < spec.fail_rate:
        return "fail"
    if draw < spec.fail_rate + spec.hang_rate:
        return "hang"
    if draw < spec.fail_rate + spec.hang_rate + spec.no_version_change_rate:
        return "no_version_change"
    return "complete"


def _default_error(status: int) -> tuple[str, str]:
    return {
        400: ("DBS.200001", "Parameter error."),
        401: ("APIGW.0301", "Incorrect IAM authentication information: token expired."),
        403: ("DBS.200013", "Permission denied."),
        404: ("DBS.200002", "The DB instance does not exist."),
        409: ("DBS.200019", BUSY_MSG),
        429: ("APIGW.0308", "The throttling threshold has been reached: policy user over ratelimit, "
                            "limit:50, time:1 second"),
        503: ("APIGW.0202", "Service unavailable: the backend is busy."),
    }.get(status, ("DBS.05000000", "Server error. Try again later."))  # fmt: skip


def _parse_upgrade_body(body: Any) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise _param_error("the body must be a JSON object")
    versions = []
    for name in ("source_version", "target_version"):
        value = body.get(name)
        if not isinstance(value, str) or not _VERSION_RE.match(value):
            raise _param_error(f"{name} must be a dotted version string")
        versions.append(value)
    source, target = versions
    if version_key(target) < version_key(source):
        raise _param_error("target_version must not be older than source_version")
    return source, target


def _int_param(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise _param_error(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _time_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if not raw:
        return None
    try:
        return calendar.timegm(time.strptime(raw, _QUERY_TIME_FORMAT))
    except ValueError:
        raise _param_error(f"{name} must look like yyyy-mm-ddThh:mm:ssZ") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _param_error(f"{where} must be a mapping")
    return value


def _validated(model: type[_M], data: dict[str, Any], where: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise _param_error(f"{where}.{loc}: {first['msg']}") from None


def _entities(wf: Workflow) -> dict[str, Any]:
    return {
        "instance": {"id": wf.proxy.instance.id, "name": wf.proxy.instance.name},
        "proxy_id": wf.proxy.spec.id,
        "node": wf.node,
        "source_version": wf.source_version,
        "target_version": wf.target_version,
    }


def _immediate_row(wf: Workflow, now: float) -> dict[str, Any]:
    status, process = wf.status(now)
    ended = wf.ended_at(now)
    inst = wf.proxy.instance
    return {
        "instance_id": inst.id,
        "instance_name": inst.name,
        "instance_status": inst.status,
        "job_id": wf.id,
        "order_id": "",
        "job_name": JOB_NAME,
        "status": status,
        "process": process,
        "created_time": format_time(wf.created_at),
        "ended_time": format_time(ended) if ended is not None else None,
        "fail_reason": wf.fail_reason if status == "Failed" else None,
        "show_detail": True,
        "extend_fields": json.dumps(
            {"proxy_id": wf.proxy.spec.id, "node": wf.node, "target_version": wf.target_version}
        ),
    }


def _node_id(proxy_id: str, index: int) -> str:
    return hashlib.sha256(f"{proxy_id}:{index}".encode()).hexdigest()[:32] + "no01"


def _proxy_entry(proxy: ProxyState) -> dict[str, Any]:
    spec = proxy.spec
    nodes = [
        {
            "id": _node_id(spec.id, k),
            "status": "ACTIVE",
            "name": f"{spec.name or spec.id}_node{k}",
            "role": "master" if k == 0 else "slave",
            "az_code": "cn-north-4a",
            "frozen_flag": 0,
        }
        for k in range(spec.nodes)
    ]
    octet = int(hashlib.sha256(spec.id.encode()).hexdigest()[:4], 16)
    return {
        "proxy": {
            "pool_id": spec.id,
            "name": spec.name or spec.id,
            "status": spec.status,
            "pool_status": spec.status,
            "node_num": spec.nodes,
            "nodes": nodes,
            "address": f"192.168.{octet >> 8}.{octet & 0xFF}",
            "port": 3306,
            "subnet_id": "a3c8d1e4-5b6f-4a7b-8c9d-0e1f2a3b4c5d",
        },
        "master_node": {"id": proxy.instance.id + "-master", "status": "ACTIVE"},
        "readonly_nodes": [],
        "htap_nodes": [],
    }


def _instance_entry(inst: InstanceState) -> dict[str, Any]:
    return {
        "id": inst.id,
        "name": inst.name,
        "status": inst.status,
        "proxy_ips": [_proxy_entry(p)["proxy"]["address"] for p in inst.proxies.values()],
        "datastore": {"type": "gaussdb-mysql", "version": "8.0", "kernel_version": "2.0.51.240300"},
    }
