"""The cloud seam: what the engine, reconcile, track, plan and discover may ask of the cloud.

``CloudApi`` is a small protocol (as httpx's transport is a seam): the aiohttp client
(``cloud.client.CloudClient``) implements it over HTTP, ``cloud.fake.FakeCloud`` in-process over the
simulator's ``Fleet`` on a virtual clock. Every call returns the project's outcome values
(``orchestrator.outcomes``) and never raises for anything the cloud or the network did.

Hooks every call takes (keyword-only):

- ``on_sent``: called when the request's headers leave (the limiter keeps its window on send times);
  may be called twice for one call when a 401 is answered by a renewed token and the call is resent.
- ``may_send``: called immediately before the request is written (after the connection is made); it
  must be quick and must not raise. Returning False aborts it: the call returns
  ``TransportFailure(CONNECT, sent=False, detail="not sent: ...")``. This is the fencing check: a
  process whose claim on the job ran out must not send.

Routes and shapes follow the API contract (shared ``docs/api-contract.md``, from the GaussDB(for MySQL)
v3 API reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from orchestrator.cloud.auth import Scope
from orchestrator.cloud.clock import CloudClock
from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    InstanceInfo,
    ProxyInfo,
    RecentJob,
    TransportFailure,
    VersionInfo,
    WorkflowInfo,
)

Failure = HttpFailure | TransportFailure
OnSent = Callable[[], None] | None
"""Called when a request's headers left (the limiter's send time)."""
MaySend = Callable[[], bool] | None
"""Called immediately before a request is written; False aborts it unsent (the fencing check)."""

NOT_SENT = "not sent: the caller's may_send check refused (its claim on the job may have run out)"


@dataclass(frozen=True, slots=True)
class ProjectRef:
    """Where project-wide calls go (list instances, jobs, immediate-jobs)."""

    project_id: str
    endpoint: str
    region: str | None = None
    x_language: str = "en-us"

    @property
    def scope(self) -> Scope:
        """What the credentials are scoped to (the project) and where the service is."""
        return Scope(project_id=self.project_id, region=self.region, endpoint=self.endpoint)


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One instance (list its proxies)."""

    project_id: str
    instance_id: str
    endpoint: str
    region: str | None = None
    x_language: str = "en-us"

    @property
    def scope(self) -> Scope:
        """What the credentials are scoped to (the project) and where the service is."""
        return Scope(project_id=self.project_id, region=self.region, endpoint=self.endpoint)


@dataclass(frozen=True, slots=True)
class ProxyRef:
    """One proxy: the unit an upgrade job works on."""

    project_id: str
    instance_id: str
    proxy_id: str
    endpoint: str
    region: str | None = None
    x_language: str = "en-us"

    @property
    def scope(self) -> Scope:
        """What the credentials are scoped to (the project) and where the service is."""
        return Scope(project_id=self.project_id, region=self.region, endpoint=self.endpoint)


AnyRef = ProjectRef | InstanceRef | ProxyRef
"""Any ref carries the project, endpoint, region and language a project-wide call needs."""


@dataclass(frozen=True, slots=True)
class RecentJobs:
    """One page of ``immediate-jobs`` (newest first) and the total the cloud counted."""

    jobs: tuple[RecentJob, ...]
    total_count: int


@dataclass(frozen=True, slots=True)
class InstancePage:
    """One page of ``GET /instances`` and the total the cloud counted for the same filters."""

    instances: tuple[InstanceInfo, ...]
    total_count: int


@dataclass(frozen=True, slots=True)
class ProxyPage:
    """One page of ``GET /instances/{id}/proxies`` (the contract gives no total: a page shorter than
    the limit is the last)."""

    proxies: tuple[ProxyInfo, ...]


class CloudApi(Protocol):
    """The calls the orchestrator makes; results are outcome values, never exceptions.

    Every method returns the documented 2xx shape as a value, or ``HttpFailure`` (any non-2xx, error
    body parsed when it is the documented one), or ``TransportFailure`` (below HTTP, or an answer whose
    body is not the documented shape: ``MALFORMED``, ``sent=True``). ``clock`` is the measured offset
    of our wall clock to the cloud's, updated from every answer's ``Date`` header.
    """

    clock: CloudClock

    async def upgrade(
        self,
        ref: ProxyRef,
        source_version: str,
        target_version: str,
        *,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> Answered | Failure:
        """``POST .../proxy/{proxy_id}/upgrade-version`` (docs/api-contract.md, section 1); the answer's
        items are validated (states exactly ACCEPT/REJECT, a workflow id on ACCEPT, the instance asked
        for, no id twice), anything else is ``MALFORMED`` with ``sent=True`` (reconcile)."""
        ...

    async def proxy_version(
        self, ref: ProxyRef, *, on_sent: OnSent = None, may_send: MaySend = None
    ) -> VersionInfo | Failure:
        """``GET .../proxy/{proxy_id}/taurusproxy/proxy-version``: current and latest version
        (docs/api-contract.md, section 2)."""
        ...

    async def job(
        self, ref: AnyRef, workflow_id: str, *, on_sent: OnSent = None, may_send: MaySend = None
    ) -> WorkflowInfo | Failure:
        """``GET /v3/{project_id}/jobs?id=``: one workflow's status (docs/api-contract.md, section 5; a
        workflow a few seconds old may not be visible yet: 400 ``DBS.200543``)."""
        ...

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
        """``GET /v3/{project_id}/immediate-jobs``: recent tasks created in ``[start_time, end_time]``
        **on the cloud's clock** (convert with ``clock.to_cloud``); limit 10, 20 or 50
        (docs/api-contract.md, section 6: the API has no instance filter)."""
        ...

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
        """``GET /v3/{project_id}/instances?offset&limit[&name]`` (limit 1-100), with ``total_count``
        (docs/api-contract.md, section 4)."""
        ...

    async def list_proxies(
        self,
        ref: InstanceRef | ProxyRef,
        *,
        offset: int = 0,
        limit: int = 100,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> ProxyPage | Failure:
        """``GET /v3/{project_id}/instances/{instance_id}/proxies?offset&limit`` (limit 1-100;
        docs/api-contract.md, section 3)."""
        ...
