"""What the proxy's current version says about the upgrade we are about to send: pure, no I/O.

The window's minutes are precious: a proxy already at the target needs no call, and a proxy that does not
run the inventory's source version (someone upgraded it by hand, or the inventory is stale) must not be
upgraded from a version nobody checked.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.inventory import version_key as inventory_version_key
from orchestrator.outcomes import VersionInfo


class Verdict(enum.StrEnum):
    UPGRADE = "upgrade"
    SKIP = "skip"
    FLAG = "flag"


@dataclass(frozen=True, slots=True)
class PreflightResult:
    verdict: Verdict
    reason: str
    hint: str | None = None
    source_version: str | None = None  # the version to send as source_version (UPGRADE only)


def version_key(v: str) -> tuple[int, ...]:
    """The inventory's numeric key (``2.24.3 == 2.24.03.000``); a version the cloud spells in a way we
    cannot parse compares as itself only (empty key never equals a parsed one)."""
    try:
        return inventory_version_key(v)
    except ValueError:
        return ()


def same_version(a: str, b: str) -> bool:
    return a == b or (version_key(a) != () and version_key(a) == version_key(b))


def judge(info: VersionInfo, *, source_version: str | None, target_version: str) -> PreflightResult:
    cur = info.current_version
    if same_version(cur, target_version):
        return PreflightResult(Verdict.SKIP, f"already at target {target_version}")
    if source_version is not None and not same_version(cur, source_version):
        return PreflightResult(
            Verdict.FLAG,
            f"source mismatch: inventory says {source_version}, proxy runs {cur}",
            "check who changed this proxy; fix source_version in the inventory (or leave it out to "
            "upgrade from whatever runs), then: orchestrator retry RUN --flagged",
        )
    if version_key(cur) > version_key(target_version):
        return PreflightResult(
            Verdict.FLAG,
            f"proxy runs {cur}, newer than target {target_version}",
            "a downgrade is not offered by the upgrade call; check the inventory's target_version",
        )
    if info.can_upgrade is False:
        return PreflightResult(
            Verdict.FLAG,
            f"the cloud reports can_upgrade: false for {cur}",
            "see the proxy's risk/guidance in the console; the proxy cannot be upgraded now",
        )
    if info.latest_version and version_key(target_version) > version_key(info.latest_version):
        return PreflightResult(
            Verdict.FLAG,
            f"target {target_version} is above the latest available version {info.latest_version}",
            "lower target_version to the latest available version",
        )
    # send the cloud's own spelling of the version it runs: it compares source_version as a string
    return PreflightResult(Verdict.UPGRADE, "preflight ok", source_version=cur)
