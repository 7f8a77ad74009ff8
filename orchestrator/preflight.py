"""What the proxy's current version says about the upgrade we are about to send: pure, no I/O.

The window's minutes are precious: a proxy already at the target needs no call, and a proxy that does not
run the inventory's source version (someone upgraded it by hand, or the inventory is stale) must not be
upgraded from a version nobody checked. Versions compare as ``orchestrator.versions`` says (numerically,
trailing zero parts ignored); a version the cloud spells in a way we cannot read is an unknown, and an
unknown is never a verdict on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.outcomes import VersionInfo
from orchestrator.versions import same_version, try_version_key, version_key

__all__ = ["PreflightResult", "Verdict", "judge", "same_version", "version_key"]


class Verdict(enum.StrEnum):
    """What preflight decides for one proxy."""

    UPGRADE = "upgrade"  # send the upgrade call
    SKIP = "skip"  # already at the target: nothing to send
    FLAG = "flag"  # a person must look first (reason and hint say why and what to do)


@dataclass(frozen=True, slots=True)
class PreflightResult:
    """A verdict with its reason (one line for the job table) and, for FLAG, a hint for the operator."""

    verdict: Verdict
    reason: str
    hint: str | None = None
    source_version: str | None = None  # the version to send as source_version (UPGRADE only)


def judge(info: VersionInfo, *, source_version: str | None, target_version: str) -> PreflightResult:
    """The verdict for a proxy that ``proxy-version`` says runs ``info.current_version``.

    In order: at the target -> SKIP; ``source_version`` given and the proxy runs another version -> FLAG
    (source mismatch); the proxy runs a newer version than the target -> FLAG (no downgrade); the cloud
    says ``can_upgrade: false`` -> FLAG; the target is above the cloud's ``latest_version`` -> FLAG;
    otherwise UPGRADE, sending the cloud's own spelling of the current version as ``source_version`` (it
    compares the string). A comparison with a version that cannot be parsed (a ``latest_version`` or
    current version in an unknown spelling) is skipped: unknown facts do not flag a proxy.
    ``target_version`` and ``source_version`` are inventory versions (already validated).
    """
    cur = info.current_version
    if same_version(cur, target_version):
        return PreflightResult(Verdict.SKIP, f"already at target {target_version}")
    if source_version is not None and not same_version(cur, source_version):
        return PreflightResult(
            Verdict.FLAG,
            f"source mismatch: inventory says {source_version}, proxy runs {cur}",
            "check who changed this proxy; fix source_version in the inventory (or leave it out to "
            "upgrade from whatever runs), then: orchestrator retry {run} --flagged",
        )
    target = try_version_key(target_version)
    current = try_version_key(cur)
    if current is not None and target is not None and current > target:
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
    latest = try_version_key(info.latest_version)
    if latest is not None and target is not None and target > latest:
        return PreflightResult(
            Verdict.FLAG,
            f"target {target_version} is above the latest available version {info.latest_version}",
            "lower target_version to the latest available version",
        )
    # send the cloud's own spelling of the version it runs: it compares source_version as a string
    return PreflightResult(Verdict.UPGRADE, "preflight ok", source_version=cur)
