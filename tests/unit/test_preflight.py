"""Preflight's verdict on a proxy from its version read (``orchestrator.preflight.judge``): pure, no
network, no database. The table of the module docstring, one case per branch and per spelling trap."""

from __future__ import annotations

import pytest

from orchestrator.outcomes import VersionInfo
from orchestrator.preflight import PreflightResult, Verdict, judge

SOURCE = "2.23.12.000"
TARGET = "2.24.03.000"
LATEST = "2.24.03.000"


def info(current: str, latest: str | None = LATEST, can_upgrade: bool | None = True) -> VersionInfo:
    return VersionInfo(current_version=current, latest_version=latest, can_upgrade=can_upgrade)


# --------------------------------------------------------------------------------------------- judge
class TestJudge:
    def test_upgrade_from_the_inventory_source(self) -> None:
        r = judge(info(SOURCE), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.UPGRADE
        assert r.source_version == SOURCE
        assert r.hint is None

    def test_upgrade_without_source_uses_the_current_version(self) -> None:
        r = judge(info("2.23.06.000"), source_version=None, target_version=TARGET)
        assert r == PreflightResult(Verdict.UPGRADE, r.reason, None, "2.23.06.000")

    def test_skip_at_target(self) -> None:
        r = judge(info(TARGET, can_upgrade=False), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.SKIP
        assert r.reason == f"already at target {TARGET}"
        assert r.source_version is None

    def test_skip_at_target_even_when_the_inventory_source_is_stale(self) -> None:
        # the upgrade already happened (by hand, or in an earlier run): nothing to flag
        r = judge(info(TARGET), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.SKIP

    def test_skip_at_target_spelled_differently(self) -> None:
        # versions compare numerically, trailing zero parts do not count (docs/inventory.md)
        r = judge(info("2.24.03.000"), source_version=None, target_version="2.24.3")
        assert r.verdict is Verdict.SKIP, r

    def test_flag_source_mismatch(self) -> None:
        r = judge(info("2.23.06.000"), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.FLAG
        assert r.reason == f"source mismatch: inventory says {SOURCE}, proxy runs 2.23.06.000"
        assert r.hint and "retry" in r.hint
        assert r.source_version is None

    def test_source_spelled_differently_is_not_a_mismatch(self) -> None:
        # "2.23.12" and "2.23.12.000" are the same version; send the spelling the cloud reported
        r = judge(info("2.23.12.000"), source_version="2.23.12", target_version=TARGET)
        assert r.verdict is Verdict.UPGRADE, r
        assert r.source_version == "2.23.12.000"

    def test_flag_proxy_newer_than_target(self) -> None:
        r = judge(info("2.25.01.000", latest="2.25.01.000"), source_version=None, target_version=TARGET)
        assert r.verdict is Verdict.FLAG
        assert r.reason == f"proxy runs 2.25.01.000, newer than target {TARGET}"
        assert r.hint

    def test_flag_cannot_upgrade(self) -> None:
        r = judge(info(SOURCE, can_upgrade=False), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.FLAG
        assert "can_upgrade: false" in r.reason
        assert r.hint

    def test_flag_target_above_latest(self) -> None:
        r = judge(info(SOURCE, latest="2.23.18.000"), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.FLAG
        assert r.reason == f"target {TARGET} is above the latest available version 2.23.18.000"
        assert r.hint

    def test_target_equal_to_latest_spelled_differently_is_not_above(self) -> None:
        r = judge(info(SOURCE, latest="2.24.3"), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.UPGRADE, r

    @pytest.mark.parametrize(
        ("latest", "can"),
        [(None, None), (None, True), (LATEST, None)],
        ids=["nothing-known", "no-latest", "no-can-upgrade"],
    )
    def test_missing_facts_do_not_block(self, latest: str | None, can: bool | None) -> None:
        r = judge(info(SOURCE, latest=latest, can_upgrade=can), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.UPGRADE

    def test_numeric_not_lexical_comparison(self) -> None:
        # 2.10 > 2.9: a lexical comparison would call the target "older"
        r = judge(info("2.9.0", latest="2.10.0"), source_version="2.9.0", target_version="2.10.0")
        assert r.verdict is Verdict.UPGRADE
        r = judge(info("2.10.0", latest="2.10.0"), source_version=None, target_version="2.9.0")
        assert r.verdict is Verdict.FLAG and "newer than target" in r.reason

    @pytest.mark.parametrize("latest", ["2.24.03.000-beta", "latest", "", "2.x", "2.24.03.000.1.2"])
    def test_an_unreadable_latest_version_is_not_a_verdict(self, latest: str) -> None:
        # once flagged every proxy "above the latest"; an unknown latest says nothing either way
        r = judge(info(SOURCE, latest=latest), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.UPGRADE, r

    def test_an_unreadable_current_version_is_not_called_newer(self) -> None:
        r = judge(info("9.9-custom"), source_version=None, target_version=TARGET)
        assert r.verdict is Verdict.UPGRADE and r.source_version == "9.9-custom"
        r = judge(info("9.9-custom"), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.FLAG and r.reason.startswith("source mismatch")

    @pytest.mark.parametrize("spelling", ["2.24", "2.24.0", "2.24.00.000"])
    def test_trailing_zero_spellings_are_one_version(self, spelling: str) -> None:
        r = judge(info("2.24.0.0"), source_version=None, target_version=spelling)
        assert r.verdict is Verdict.SKIP
        r = judge(info(SOURCE, latest="2.24.0.0"), source_version=SOURCE, target_version=spelling)
        assert r.verdict is Verdict.UPGRADE

    def test_mismatch_is_checked_before_the_cloud_facts(self) -> None:
        # a proxy nobody expected at this version is flagged for that, whatever else is true
        r = judge(info("2.23.06.000", can_upgrade=False), source_version=SOURCE, target_version=TARGET)
        assert r.verdict is Verdict.FLAG and r.reason.startswith("source mismatch")
