"""Discovery: build an inventory from what the cloud says, instead of typing IDs (issue 15 part 5).

``discover`` lists the project's instances (paging on ``total_count``), each instance's proxies (paging
until a short page) and each ACTIVE proxy's current and latest version, all through a ``CloudApi`` and
the caller's rate-limit permit. ``render_inventory`` writes the YAML inventory ``orchestrator validate``
accepts, with a comment for every proxy left out and why.

Credentials are proven by the first call alone (the first page of instances): a refused credential
(401/403) stops discovery at once with ``CredentialsRefused`` (issue 10 kind 6: the gateway locks an
access key after five bad signatures, so never send thirty). After that, reads run ``concurrency`` at a
time; should a later call still be refused, ``may_send`` keeps every other worker from sending.

Routes and fields: shared ``docs/api-contract.md`` sections 2-4 (GaussDB(for MySQL) v3 API reference).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar

from orchestrator.cloud.answers import one_line
from orchestrator.cloud.api import (
    CloudApi,
    InstancePage,
    InstanceRef,
    MaySend,
    OnSent,
    ProjectRef,
    ProxyPage,
    ProxyRef,
)
from orchestrator.outcomes import (
    HttpFailure,
    InstanceInfo,
    ProxyInfo,
    TransportFailure,
    TransportKind,
    VersionInfo,
)

PAGE = 100  # the most the listing routes accept (contract 3 and 4)
ACTIVE = "ACTIVE"
PermitFactory = Callable[[], AbstractAsyncContextManager[OnSent]]
"""Gives one call's start permit (the run's rate limit) and yields the hook to call when it is sent."""
Sleep = Callable[[float], Awaitable[None]]
Target = Literal["latest"] | str
_T = TypeVar("_T")
_R = TypeVar("_R")

# The inventory's rules (docs/inventory.md): ids put into URL paths, versions of 2-5 numeric parts.
_PROJECT_ID = re.compile(r"[0-9a-zA-Z]{32}")
_SUFFIXED_ID = re.compile(r"[0-9a-zA-Z]{32}(?:[a-z]{2}[0-9]{2})?")
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){1,4}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class DiscoveryError(Exception):
    """Discovery cannot produce an inventory; the message is one line, safe to print (no secrets)."""


class CredentialsRefused(DiscoveryError):
    """The cloud refused the credentials (HTTP 401/403): stop, exit 2, send nothing more."""

    def __init__(self, message: str, http_status: int, error_code: str | None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code


@dataclass(frozen=True, slots=True)
class DiscoveredProxy:
    """One proxy as discovery saw it; ``skip`` says why it is left out (None: it goes in the inventory)."""

    instance_id: str
    instance_name: str | None
    proxy_id: str
    proxy_name: str | None
    status: str | None
    current_version: str | None = None
    latest_version: str | None = None
    can_upgrade: bool | None = None
    target_version: str | None = None
    skip: str | None = None


@dataclass(frozen=True, slots=True)
class Discovery:
    """What ``discover`` found: every proxy of every matching instance, in the cloud's listing order.

    ``problems`` are one-line notes about what could not be read (a proxy list or a version that failed
    after retries); those proxies are left out. ``calls`` counts the cloud calls made."""

    project_id: str
    endpoint: str
    region: str | None
    target: str
    name_glob: str | None
    instances: tuple[InstanceInfo, ...]
    proxies: tuple[DiscoveredProxy, ...]
    problems: tuple[str, ...] = ()
    calls: int = 0

    @property
    def to_upgrade(self) -> tuple[DiscoveredProxy, ...]:
        """The proxies that go into the inventory (no ``skip`` reason), in listing order."""
        return tuple(p for p in self.proxies if p.skip is None)

    @property
    def skipped(self) -> tuple[DiscoveredProxy, ...]:
        """The proxies left out, each with its ``skip`` reason, in listing order."""
        return tuple(p for p in self.proxies if p.skip is not None)


@asynccontextmanager
async def no_permit() -> AsyncIterator[OnSent]:
    """A permit that waits for nothing (tests; the CLI passes the run's limiter)."""
    yield None


@dataclass
class _Session:
    cloud: CloudApi
    permit: PermitFactory
    sleep: Sleep
    attempts: int
    stopped: bool = False
    calls: int = 0
    problems: list[str] = field(default_factory=list)

    def may_send(self) -> bool:
        return not self.stopped

    async def read(
        self, what: str, call: Callable[[OnSent, MaySend], Awaitable[_T | HttpFailure | TransportFailure]]
    ) -> _T | HttpFailure | TransportFailure:
        """One read with retries for what a later try may cure (429, 5xx, lost or garbled answers);
        raises ``CredentialsRefused`` on 401/403 and ``DiscoveryError`` on a TLS failure."""
        res: _T | HttpFailure | TransportFailure
        for attempt in range(self.attempts):
            async with self.permit() as on_sent:
                if self.stopped:
                    raise DiscoveryError("discovery stopped")
                self.calls += 1
                res = await call(on_sent, self.may_send)
            if isinstance(res, HttpFailure) and res.http_status in (401, 403):
                self.stopped = True
                code = f" {res.error_code}" if res.error_code else ""
                raise CredentialsRefused(
                    f"the cloud refused the credentials while reading {what} (HTTP {res.http_status}{code}: "
                    f"{res.error_msg or 'no message'}); nothing more was sent",
                    res.http_status,
                    res.error_code,
                )
            if isinstance(res, TransportFailure) and res.kind is TransportKind.TLS:
                self.stopped = True
                raise DiscoveryError(f"cannot reach the cloud safely: {res.detail}")
            delay = _retry_delay(res, attempt)
            if delay is None or attempt + 1 == self.attempts:
                return res
            await self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def _retry_delay(res: object, attempt: int) -> float | None:
    backoff = min(8.0, float(2 ** min(attempt, 3)))
    if isinstance(res, HttpFailure):
        if res.http_status == 429 or res.http_status >= 500:
            return res.retry_after if res.retry_after is not None else backoff
        return None
    if isinstance(res, TransportFailure):
        if res.kind is TransportKind.CONNECT and res.detail.startswith("not sent"):
            return None
        return backoff
    return None


def _failure_text(res: HttpFailure | TransportFailure) -> str:
    if isinstance(res, HttpFailure):
        code = f" {res.error_code}" if res.error_code else ""
        return f"HTTP {res.http_status}{code}: {res.error_msg or 'no message'}"
    return f"{res.kind.value}: {res.detail}"


async def discover(
    cloud: CloudApi,
    *,
    project_id: str,
    endpoint: str,
    region: str | None,
    name_glob: str | None = None,
    target: Target = "latest",
    permit: PermitFactory = no_permit,
    concurrency: int = 4,
    attempts: int = 3,
    sleep: Sleep = asyncio.sleep,
) -> Discovery:
    """List the project's instances (those whose name matches ``name_glob``, fnmatch, case-sensitive;
    all when None), their proxies and each ACTIVE proxy's versions, and decide which to upgrade to
    ``target`` (``"latest"``: each proxy's own ``latest_version``; else a version like ``2.24.03.000``).

    Every call goes through ``permit()`` (the rate limit). Reads are retried ``attempts`` times in all
    for 429/5xx/transport failures (Retry-After honoured, else 1, 2, 4... s up to 8 s, on ``sleep``).

    Raises ``CredentialsRefused`` at the first 401/403 (nothing more is sent), ``DiscoveryError`` when
    the instance list cannot be read or on a TLS failure. A proxy list or version that cannot be read
    leaves those proxies out with a note in ``Discovery.problems``."""
    if target != "latest" and not _VERSION.fullmatch(target):
        raise DiscoveryError(f"target must be 'latest' or a version like 2.24.03.000 (got {target!r})")
    if concurrency < 1 or attempts < 1:
        raise ValueError("concurrency and attempts must be at least 1")
    session = _Session(cloud, permit, sleep, attempts)
    project = ProjectRef(project_id=project_id, endpoint=endpoint, region=region)

    instances = await _list_instances(session, project)
    wanted = [i for i in instances if name_glob is None or fnmatch.fnmatchcase(i.name or "", name_glob)]

    async def proxies_of(inst: InstanceInfo) -> list[ProxyInfo]:
        ref = InstanceRef(
            project_id=project_id, instance_id=inst.instance_id, endpoint=endpoint, region=region
        )
        return await _list_proxies(session, ref, inst)

    listed = await _pool(wanted, proxies_of, concurrency)
    pairs = [(inst, proxy) for inst, proxies in zip(wanted, listed, strict=True) for proxy in proxies]

    async def judge(pair: tuple[InstanceInfo, ProxyInfo]) -> DiscoveredProxy | None:
        inst, proxy = pair
        return await _judge(session, project, inst, proxy, target)

    judged = await _pool(pairs, judge, concurrency)
    return Discovery(
        project_id=project_id,
        endpoint=endpoint,
        region=region,
        target=target,
        name_glob=name_glob,
        instances=tuple(wanted),
        proxies=tuple(p for p in judged if p is not None),
        problems=tuple(session.problems),
        calls=session.calls,
    )


def _instances_page(
    cloud: CloudApi, project: ProjectRef, offset: int, on_sent: OnSent, may_send: MaySend
) -> Awaitable[InstancePage | HttpFailure | TransportFailure]:
    return cloud.list_instances(project, offset=offset, limit=PAGE, on_sent=on_sent, may_send=may_send)


def _proxies_page(
    cloud: CloudApi, ref: InstanceRef, offset: int, on_sent: OnSent, may_send: MaySend
) -> Awaitable[ProxyPage | HttpFailure | TransportFailure]:
    return cloud.list_proxies(ref, offset=offset, limit=PAGE, on_sent=on_sent, may_send=may_send)


async def _list_instances(session: _Session, project: ProjectRef) -> list[InstanceInfo]:
    found: dict[str, InstanceInfo] = {}
    offset = 0
    while True:
        page = partial(_instances_page, session.cloud, project, offset)
        res = await session.read("the instance list", page)
        if not isinstance(res, InstancePage):
            raise DiscoveryError(
                f"cannot list the instances of project {project.project_id}: {_failure_text(res)}"
            )
        new = [i for i in res.instances if i.instance_id not in found]
        found.update((i.instance_id, i) for i in new)
        offset += len(res.instances)
        # Stop at the total, at an empty page, or when a page brings nothing new (a server that
        # ignores offset would otherwise be asked forever).
        if not res.instances or not new or offset >= res.total_count:
            return list(found.values())


async def _list_proxies(session: _Session, ref: InstanceRef, inst: InstanceInfo) -> list[ProxyInfo]:
    found: dict[str, ProxyInfo] = {}
    offset = 0
    while True:
        res = await session.read(
            f"the proxies of instance {inst.instance_id}", partial(_proxies_page, session.cloud, ref, offset)
        )
        if not isinstance(res, ProxyPage):
            session.problems.append(
                f"instance {_label(inst.name, inst.instance_id)}: proxies not listed ({_failure_text(res)}); "
                "its proxies are left out"
            )
            return list(found.values())
        new = [p for p in res.proxies if p.proxy_id not in found]
        found.update((p.proxy_id, p) for p in new)
        offset += len(res.proxies)
        if len(res.proxies) < PAGE or not new:
            return list(found.values())


async def _judge(
    session: _Session, project: ProjectRef, inst: InstanceInfo, proxy: ProxyInfo, target: Target
) -> DiscoveredProxy | None:
    base = DiscoveredProxy(
        instance_id=inst.instance_id,
        instance_name=inst.name,
        proxy_id=proxy.proxy_id,
        proxy_name=proxy.name,
        status=proxy.status,
    )
    unusable = _unusable_ids(project.project_id, inst.instance_id, proxy.proxy_id)
    if unusable:
        return _with(base, skip=unusable)
    if proxy.status != ACTIVE:
        return _with(base, skip=f"not ACTIVE (status {one_line(proxy.status or 'unknown', 40)})")
    ref = ProxyRef(
        project_id=project.project_id,
        instance_id=inst.instance_id,
        proxy_id=proxy.proxy_id,
        endpoint=project.endpoint,
        region=project.region,
    )
    res = await session.read(
        f"the version of proxy {proxy.proxy_id}",
        lambda on_sent, may_send: session.cloud.proxy_version(ref, on_sent=on_sent, may_send=may_send),
    )
    if not isinstance(res, VersionInfo):
        session.problems.append(
            f"proxy {_label(proxy.name, proxy.proxy_id)}: version not read ({_failure_text(res)}); left out"
        )
        return None
    seen = _with(
        base,
        current_version=res.current_version,
        latest_version=res.latest_version,
        can_upgrade=res.can_upgrade,
    )
    return _decide(seen, target)


def _decide(p: DiscoveredProxy, target: Target) -> DiscoveredProxy:
    """Which version this proxy goes to, or why it is left out (pure)."""
    current, latest = p.current_version or "", p.latest_version
    goal = latest if target == "latest" else target
    if goal is None:
        return _with(p, skip="no upgrade available (the cloud gives no latest version)")
    if not _VERSION.fullmatch(goal):
        return _with(p, skip=f"no usable target version (latest {one_line(goal, 40)!r})")
    if _same(current, goal):
        return _with(p, skip=f"already at target {goal}")
    cur_key, goal_key, latest_key = _key(current), _key(goal), _key(latest or "")
    if cur_key is not None and goal_key is not None and cur_key > goal_key:
        return _with(p, skip=f"runs {current}, newer than the target {goal}")
    if latest_key is not None and goal_key is not None and goal_key > latest_key:
        return _with(p, skip=f"no upgrade available to {goal} (latest is {latest})")
    if p.can_upgrade is False:
        return _with(p, skip=f"no upgrade available (can_upgrade false; runs {current}, latest {latest})")
    return _with(p, target_version=goal)


def _key(version: str) -> tuple[int, ...] | None:
    # Numeric, trailing zero parts ignored (docs/inventory.md "Versions"); None: not a version, no verdict.
    # TODO(lead): use orchestrator.versions (H1) once it lands, so there is one version_key.
    if not _VERSION.fullmatch(version):
        return None
    parts = [int(x) for x in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _same(a: str, b: str) -> bool:
    ka, kb = _key(a), _key(b)
    return a == b or (ka is not None and ka == kb)


def _with(p: DiscoveredProxy, **changes: Any) -> DiscoveredProxy:
    return replace(p, **changes)


def _unusable_ids(project_id: str, instance_id: str, proxy_id: str) -> str | None:
    if not _PROJECT_ID.fullmatch(project_id):
        return "project id is not 32 letters/digits"
    if not _SUFFIXED_ID.fullmatch(instance_id) or instance_id[32:34] == "po":
        return f"instance id {_quote(instance_id)} is not usable in an inventory"
    if not _SUFFIXED_ID.fullmatch(proxy_id) or proxy_id[32:34] == "in":
        return f"proxy id {_quote(proxy_id)} is not usable in an inventory"
    return None


async def _pool(items: Sequence[_T], fn: Callable[[_T], Awaitable[_R]], concurrency: int) -> list[_R]:
    """``fn`` over ``items`` with at most ``concurrency`` running, results in input order. The first
    exception stops the other workers from taking new items and is raised once they are done."""
    results: list[_R | None] = [None] * len(items)
    next_index = 0
    failure: BaseException | None = None

    async def worker() -> None:
        nonlocal next_index, failure
        while failure is None and next_index < len(items):
            i, next_index = next_index, next_index + 1
            try:
                results[i] = await fn(items[i])
            except Exception as exc:  # the first failure wins; the others just stop
                failure = failure or exc
                return

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    if failure is not None:
        raise failure
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- rendering


def render_inventory(discovery: Discovery, *, header_comment: str = "") -> str:
    """The YAML inventory for ``discovery.to_upgrade`` (``orchestrator validate`` accepts it), with the
    header comment, a summary, the problems and one comment per skipped proxy naming it and why.

    Shape (docs/inventory.md): ``defaults`` (project_id, region, endpoint when given, target_version
    when every proxy has the same) and ``proxies`` (instance_id, proxy_id, name, source_version = the
    version discovery read, target_version when not in defaults). Every string is JSON-quoted (a valid
    YAML double-quoted scalar); names from the cloud lose control characters and are cut to 128
    characters. Raises ``ValueError`` when no proxy is to be upgraded (an inventory needs at least one)."""
    chosen = discovery.to_upgrade
    if not chosen:
        raise ValueError("no proxy to upgrade: every proxy found was skipped (see Discovery.skipped)")
    targets = {p.target_version for p in chosen}
    shared_target = targets.pop() if len(targets) == 1 else None
    lines = [f"# {_comment(line)}" for line in header_comment.splitlines()] if header_comment else []
    lines.append(
        f"# {len(discovery.instances)} instance(s), {len(discovery.proxies)} proxies found: "
        f"{len(chosen)} to upgrade, {len(discovery.skipped)} skipped (target: {_comment(discovery.target)})"
    )
    if discovery.name_glob is not None:
        lines.append(f"# instances whose name matches {_comment(discovery.name_glob)}")
    lines += [f"# problem: {_comment(text)}" for text in discovery.problems]
    lines.append("defaults:")
    lines.append(f"  project_id: {_q(discovery.project_id)}")
    if discovery.region:
        lines.append(f"  region: {_q(discovery.region)}")
    if discovery.endpoint:
        lines.append(f"  endpoint: {_q(discovery.endpoint)}")
    if shared_target is not None:
        lines.append(f"  target_version: {_q(shared_target)}")
    lines.append("proxies:")
    for p in chosen:
        fields = [f"instance_id: {_q(p.instance_id)}", f"proxy_id: {_q(p.proxy_id)}"]
        name = _name(p)
        if name:
            fields.append(f"name: {_q(name)}")
        if p.current_version and _VERSION.fullmatch(p.current_version):
            fields.append(f"source_version: {_q(p.current_version)}")
        if shared_target is None and p.target_version:
            fields.append(f"target_version: {_q(p.target_version)}")
        lines.append("  - {" + ", ".join(fields) + "}")
    if discovery.skipped:
        lines.append("# skipped:")
        for p in discovery.skipped:
            lines.append(
                f"#   instance {_comment(_label(p.instance_name, p.instance_id))} "
                f"proxy {_comment(_label(p.proxy_name, p.proxy_id))}: {_comment(p.skip or '')}"
            )
    return "\n".join(lines) + "\n"


def _name(p: DiscoveredProxy) -> str | None:
    parts = [part for part in (p.instance_name, p.proxy_name) if part]
    if not parts:
        return None
    text = " ".join(_CONTROL.sub(" ", "/".join(parts)).split())
    return text[:128] or None


def _label(name: str | None, ident: str) -> str:
    return f"{name} ({ident})" if name else ident


def _q(value: str) -> str:
    # JSON strings are YAML double-quoted scalars; ensure_ascii=False keeps names readable.
    return json.dumps(value, ensure_ascii=False)


def _quote(value: str) -> str:
    return json.dumps(value[:60], ensure_ascii=True)


def _comment(text: str) -> str:
    """Foreign text safe inside a YAML comment: one line, no control characters, bounded."""
    return one_line(_CONTROL.sub(" ", text), 200) or ""
