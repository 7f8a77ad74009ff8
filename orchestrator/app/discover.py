"""``orchestrator discover``: build an inventory from what the cloud lists (instances, their proxies, each
proxy's current and latest version), with the same credentials and rate limit as ``run``."""

from __future__ import annotations

import contextlib
import contextlib as _ctx
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.text import Text

from orchestrator.app.runtime import build_cloud
from orchestrator.cloud.api import CloudApi
from orchestrator.errors import EXIT_OK, EXIT_PROBLEMS, UsageError
from orchestrator.limiter import SlidingWindowLimiter, parse_rate
from orchestrator.options import RunOptions


async def discover_inventory(
    *,
    project_id: str,
    region: str | None,
    endpoint: str | None,
    name_glob: str | None,
    target: str,
    output: str | None,
    rate: str,
    out: Console,
    cloud: CloudApi | None = None,
) -> int:
    """Write (or print) an inventory of the proxies to upgrade; exit 2 at the first refused credential."""
    from orchestrator.cloud.endpoints import endpoint_for_region
    from orchestrator.discovery import CredentialsRefused, DiscoveryError, discover, render_inventory

    try:
        options = RunOptions(rate=rate, endpoint_override=endpoint)
        base = options.endpoint_override or (endpoint_for_region(region) if region else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if base is None:
        raise UsageError("discover: give --region (or --endpoint)")
    limiter = SlidingWindowLimiter(parse_rate(options.rate))

    @contextlib.asynccontextmanager
    async def permit() -> AsyncIterator[Callable[[], None] | None]:
        start = await limiter.acquire()
        yield start.sent

    closer = None
    if cloud is None:
        built = await build_cloud(options)
        cloud, closer = built.api, built.close
    try:
        found = await discover(
            cloud,
            project_id=project_id,
            endpoint=base,
            region=region,
            name_glob=name_glob,
            target=target,
            permit=permit,
        )
    except CredentialsRefused as exc:
        raise UsageError(str(exc)) from None
    except DiscoveryError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if closer is not None:
            with _ctx.suppress(Exception):
                await closer()
    args = (
        f"--project-id {project_id}"
        + (f" --region {region}" if region else "")
        + (f" --name-glob {name_glob}" if name_glob else "")
        + f" --target {target}"
    )
    try:
        text = render_inventory(
            found, header_comment=f"orchestrator discover {args} at {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
        )
    except ValueError as exc:
        out.print(Text(f"nothing to upgrade: {exc}"))
        return EXIT_PROBLEMS if found.problems else EXIT_OK
    if output:
        Path(output).write_text(text, encoding="utf-8")
        out.print(
            Text(f"wrote {output}: {len(found.to_upgrade)} proxies to upgrade, {len(found.skipped)} skipped")
        )
    else:
        out.file.write(text)
    for p in found.problems:
        out.print(Text(f"warning: {p}"))
    return EXIT_PROBLEMS if found.problems else EXIT_OK
