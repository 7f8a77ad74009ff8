"""The composition root: ``build_runtime`` wires the job table, the cloud, the limiter, the run-wide gate,
the policy, the fence and the run-wide controls for one process working on one run. Every command that
runs jobs (run, resume, worker, demo) builds its runtime here; ``plan`` and ``discover`` take the cloud
half (``build_cloud``) with the same credentials, endpoints and rate limit.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.app.controls import make_decider
from orchestrator.cloud.api import CloudApi
from orchestrator.errors import UsageError
from orchestrator.limiter import SlidingWindowLimiter, parse_rate
from orchestrator.options import RunOptions
from orchestrator.policy import parse_policy
from orchestrator.runtime import Controls, Events, LeaseKeeper, Mono, NullEvents, Runtime
from orchestrator.store import JobStore

Closer = Callable[[], Awaitable[None]]


@dataclass
class Cloud:
    """A cloud client and how to close what it holds (session, IAM token cache)."""

    api: CloudApi
    close: Closer


async def build_cloud(options: RunOptions, env: Mapping[str, str] | None = None) -> Cloud:
    """The HTTP cloud client with the credentials the environment names (docs/auth.md).
    Raises ``UsageError`` for half-configured credentials (naming variables, never values)."""
    from orchestrator.cloud.auth import AuthError, credentials_from_env
    from orchestrator.cloud.client import CloudClient, make_session

    env = os.environ if env is None else env
    session = make_session(ca_bundle=options.ca_bundle)
    try:
        creds = credentials_from_env(
            env, iam_endpoint=env.get("ORCHESTRATOR_IAM_ENDPOINT") or None, session=session
        )
    except AuthError as exc:
        await session.close()
        raise UsageError(f"credentials: {exc}") from None
    client = CloudClient(session, creds, timeout=options.timeout, connect_timeout=options.connect_timeout)

    async def close() -> None:
        with contextlib.suppress(Exception):
            await creds.aclose()
        with contextlib.suppress(Exception):
            await session.close()

    return Cloud(client, close)


def check_credentials_config(env: Mapping[str, str] | None = None) -> None:
    """Refuse half-configured credentials (AK without SK...) before anything is written."""
    from orchestrator.cloud.auth import AuthError, credentials_from_env

    try:
        credentials_from_env(os.environ if env is None else env)
    except AuthError as exc:
        raise UsageError(f"credentials: {exc}") from None


async def build_runtime(
    store: JobStore,
    run_id: int,
    options: RunOptions,
    *,
    worker_id: str,
    role: str,
    cloud: CloudApi,
    events: Events | None = None,
    since: datetime,
    confirm: bool = False,
    metrics: Any = None,
    mono: Mono = time.monotonic,
) -> Runtime:
    """Everything one process needs to work on ``run_id``. ``cloud``: the HTTP client from
    ``build_cloud``, or an in-process fake in tests. ``since``: when this process started dispatching.
    ``mono``: the monotonic clock (seconds) of the fence, the limiter and the controls (a virtual-time
    loop's ``time`` in tests; the limiter then sleeps with ``asyncio.sleep`` on that loop)."""
    try:
        policy = parse_policy(options.policy)
    except ValueError as exc:
        raise UsageError(f"the run's stored policy: {exc}") from None
    rate = parse_rate(options.rate)
    rt = Runtime(
        store=store,
        cloud=cloud,
        limiter=SlidingWindowLimiter(rate, clock=mono),
        policy=policy,
        options=options,
        run_id=run_id,
        worker_id=worker_id,
        role=role,
        events=events or NullEvents(),
        rng=random.Random(options.seed),
        lease=LeaseKeeper(options.lease, mono=mono),
        metrics=metrics,
        mono=mono,
    )
    rt.controls = Controls(make_decider(options, since=since, confirm=confirm), mono=mono, now=store.db_now)
    if store.is_postgres:
        from orchestrator.gate import SharedGate

        rt.gate = SharedGate(store, run_id, worker_id, rate, options.concurrency, lease_s=options.lease)
    return rt
