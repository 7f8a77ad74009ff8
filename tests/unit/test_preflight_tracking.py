"""Pure pieces of "follow every upgrade to the end": preflight verdicts, workflow summaries, matching a lost
answer's job, cloud timestamps, and the plan's duration estimate. No network, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from orchestrator.inventory import ProxyEntry
from orchestrator.outcomes import RecentJob, VersionInfo
from orchestrator.planner import PlanResult, PlanRow, parse_duration
from orchestrator.preflight import PreflightResult, Verdict, judge
from orchestrator.reconcile import CLOCK_SKEW, Match, match_recent, parse_cloud_time
from orchestrator.store import WorkflowRow
from orchestrator.tracker import summarize

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


# ----------------------------------------------------------------------------------------- summarize
T0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
_ids = iter(range(1, 10_000))


def wf(
    attempt: int | None,
    status: str | None,
    state: str = "ACCEPT",
    workflow_id: str | None = "auto",
    source: str = "answer",
) -> WorkflowRow:
    n = next(_ids)
    return WorkflowRow(
        id=n,
        job_id=1,
        attempt_id=attempt,
        workflow_id=f"wf-{n}" if workflow_id == "auto" else workflow_id,
        instance_id="i",
        state=state,
        error_message=None if state == "ACCEPT" else "Upgrade failed due to insufficient subnet ip",
        source=source,
        job_status=status,
        progress=None,
        fail_reason="boom" if status == "Failed" else None,
        created_at=T0,
        ended_at=None,
    )


class TestSummarize:
    def test_all_open(self) -> None:
        rows = [wf(1, None), wf(1, "Pending"), wf(1, "Running")]
        p = summarize(rows, 1)
        assert p.open == tuple(rows) and p.failed == () and p.completed == 0

    def test_all_completed(self) -> None:
        p = summarize([wf(1, "Completed"), wf(1, "Completed")], 1)
        assert p.open == () and p.failed == () and p.completed == 2

    @pytest.mark.parametrize("status", ["Failed", "Canceled", "Unauthorized"])
    def test_final_but_not_completed_is_failed(self, status: str) -> None:
        bad = wf(1, status)
        p = summarize([wf(1, "Completed"), bad, wf(1, "Running")], 1)
        assert p.failed == (bad,) and p.completed == 1 and len(p.open) == 1

    def test_only_the_current_attempt_counts(self) -> None:
        old_failed = wf(1, "Failed")
        current = wf(2, "Running")
        p = summarize([old_failed, current], 2)
        assert p.open == (current,) and p.failed == () and p.completed == 0

    def test_rejected_items_and_missing_ids_are_not_followed(self) -> None:
        rows = [wf(1, None, state="REJECT"), wf(1, None, workflow_id=None), wf(1, "Completed")]
        p = summarize(rows, 1)
        assert p.open == () and p.failed == () and p.completed == 1

    def test_reconciled_workflow_counts_with_its_attempt(self) -> None:
        found = wf(3, "Running", source="reconciled")
        p = summarize([wf(1, "Failed"), found], 3)
        assert p.open == (found,) and p.failed == ()

    def test_no_row_for_the_attempt_falls_back_to_every_accepted_row(self) -> None:
        rows = [wf(None, "Running"), wf(None, "Completed"), wf(None, None, state="REJECT")]
        p = summarize(rows, 7)
        assert p.open == (rows[0],) and p.completed == 1
        p = summarize(rows, None)
        assert p.open == (rows[0],) and p.completed == 1

    def test_nothing_to_follow(self) -> None:
        p = summarize([], 1)
        assert p.open == () and p.failed == () and p.completed == 0


# ------------------------------------------------------------------------------------ parse_cloud_time
class TestParseCloudTime:
    @pytest.mark.parametrize(
        "text",
        [
            "2024-03-01T10:00:00+0000",  # the job API's shape
            "2024-03-01T10:00:00Z",  # the immediate-jobs query shape
            "2024-03-01T10:00:00+00:00",
            "2024-03-01T18:00:00+0800",
            "2024-03-01T05:00:00-0500",
            " 2024-03-01T10:00:00+0000 ",
            "2024-03-01 10:00:00+0000",
            "2024-03-01T10:00:00",  # no zone: the cloud's times are UTC
        ],
    )
    def test_same_instant(self, text: str) -> None:
        t = parse_cloud_time(text)
        assert t == datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
        assert t is not None and t.utcoffset() == timedelta(0)

    def test_fraction_of_a_second(self) -> None:
        assert parse_cloud_time("2024-03-01T10:00:00.250Z") == datetime(
            2024, 3, 1, 10, 0, 0, 250000, tzinfo=UTC
        )

    @pytest.mark.parametrize("text", [None, "", "   ", "yesterday", "2024-13-01T10:00:00Z", "1709287200"])
    def test_unreadable_is_none(self, text: str | None) -> None:
        assert parse_cloud_time(text) is None

    def test_is_comparable_with_our_clock(self) -> None:
        t = parse_cloud_time("2024-03-01T10:00:00+0000")
        assert t is not None and t < datetime.now(UTC)
        assert t == datetime(2024, 3, 1, 11, 0, tzinfo=timezone(timedelta(hours=1)))


# ---------------------------------------------------------------------------------------- match_recent
INST = "517ea793ab91438cbfcd9c4b1c958b1ein07"
OTHER_INST = "617ea793ab91438cbfcd9c4b1c958b1ein07"
PROXY = "0f46fc46396e4fb19a0cb52f578e9511po01"
OTHER_PROXY = "1f46fc46396e4fb19a0cb52f578e9511po01"
SENT = datetime(2024, 3, 1, 10, 0, 0, 600000, tzinfo=UTC)


def job(
    job_id: str,
    *,
    instance: str | None = INST,
    proxy: str | None = PROXY,
    created: str | None = "2024-03-01T10:00:01+0000",
    name: str | None = "Upgrade proxy version",
    fields: str | None = "auto",
) -> RecentJob:
    if fields == "auto":
        fields = (
            None if proxy is None else f'{{"proxy_id": "{proxy}", "node": 0, "target_version": "{TARGET}"}}'
        )
    return RecentJob(
        job_id=job_id,
        instance_id=instance,
        job_name=name,
        status="Running",
        created_time=created,
        extend_fields=fields,
    )


def match(jobs: list[RecentJob], known: set[str] | None = None) -> Match:
    return match_recent(jobs, instance_id=INST, proxy_id=PROXY, sent_at=SENT, known=known or set())


class TestMatchRecent:
    def test_our_proxy_id_in_the_fields(self) -> None:
        ours = job("ours")
        m = match([job("other-inst", instance=OTHER_INST), ours, job("other-proxy", proxy=OTHER_PROXY)])
        assert m == Match((ours,))

    def test_nothing_new(self) -> None:
        assert match([]) == Match()
        assert match([job("x", instance=OTHER_INST), job("y", proxy=OTHER_PROXY)]) == Match()

    def test_known_workflows_are_not_candidates(self) -> None:
        # a workflow already recorded for some job (this one's earlier attempt, or a sibling) is not new
        assert match([job("old")], known={"old"}) == Match()
        fresh = job("fresh")
        assert match([job("old"), fresh], known={"old"}) == Match((fresh,))

    def test_jobs_from_before_the_send_are_ignored(self) -> None:
        too_old = (SENT - CLOCK_SKEW - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S+0000")
        assert match([job("before", created=too_old)]) == Match()

    def test_whole_second_timestamps_before_the_send_still_match(self) -> None:
        # the cloud truncates to the second: a job created at 10:00:00.9, after the send at 10:00:00.6,
        # shows as 10:00:00, i.e. before the send
        same_second = job("same", created="2024-03-01T10:00:00+0000")
        assert match([same_second]) == Match((same_second,))

    def test_unreadable_creation_time_is_not_a_match(self) -> None:
        assert match([job("x", created=None)]) == Match()
        assert match([job("y", created="soon")]) == Match()

    def test_by_name_when_no_fields(self) -> None:
        named = job("named", proxy=None)
        assert match([named]) == Match((named,))

    def test_by_name_ignores_unrelated_jobs_on_the_instance(self) -> None:
        named = job("named", proxy=None)
        unrelated = job("restart", proxy=None, name="Restart instance")
        m = match([unrelated, named])
        assert m.jobs == (named,)

    def test_every_node_workflow_naming_our_proxy_is_ours(self) -> None:
        # a 2-node proxy answers one workflow per node, both naming the proxy: record both
        a, b = job("a"), job("b")
        m = match([a, b])
        assert set(m.jobs) == {a, b} and m.ambiguous == ()

    def test_two_by_name_is_ambiguous(self) -> None:
        a, b = job("a", proxy=None), job("b", proxy=None)
        m = match([a, b])
        assert m.jobs == () and set(m.ambiguous) == {a, b}

    def test_an_unnamed_job_on_the_instance_is_ambiguous_not_ignored(self) -> None:
        # we cannot tell it is not our upgrade: flag rather than resend
        odd = job("odd", proxy=None, name="Some operation")
        m = match([odd])
        assert m.jobs == () and m.ambiguous == (odd,)

    def test_our_id_wins_over_name_only_candidates(self) -> None:
        ours = job("ours")
        m = match([job("named", proxy=None), ours])
        assert m.jobs == (ours,)

    def test_another_proxys_job_is_never_ours(self) -> None:
        m = match([job("theirs", proxy=OTHER_PROXY, name="Upgrade proxy version")])
        assert m == Match()


# -------------------------------------------------------------------------------------- parse_duration
class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("about 5 minutes", 300),
            ("5 min", 300),
            ("5min", 300),
            ("5 MINUTES", 300),
            ("300", 300),
            ("300 s", 300),
            ("45 seconds", 45),
            ("about 30s", 30),
            ("2 hours", 7200),
            ("1.5 h", 5400),
            ("0.5 hour", 1800),
            (300, 300),
            (2.5, 2.5),
        ],
    )
    def test_known_shapes(self, text: object, seconds: float) -> None:
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", [None, "", "soon", "unknown", {"minutes": 5}, ["5"]])
    def test_unknown_is_none(self, text: object) -> None:
        assert parse_duration(text) is None

    def test_a_range_is_read_in_its_unit(self) -> None:
        # "2-5 minutes" is minutes, not 2 seconds: a plan must not underestimate the window 60-fold
        d = parse_duration("2-5 minutes")
        assert d is not None and 120 <= d <= 300


# -------------------------------------------------------------------------------------------- estimate
def entry(instance: str, proxy: str) -> ProxyEntry:
    return ProxyEntry(
        project_id="054e292c9880d4992f02c0196d3ea468",
        instance_id=instance,
        proxy_id=proxy,
        region="cn-north-4",
        endpoint=None,
        source_version=SOURCE,
        target_version=TARGET,
        x_language="en-us",
        name=None,
        line=1,
    )


def row(instance: str, proxy: str, verdict: str, duration: float | None) -> PlanRow:
    return PlanRow(entry(instance, proxy), verdict, "r", SOURCE, duration)


class TestEstimate:
    def test_send_time_plus_the_busiest_instance(self) -> None:
        rows = [
            row("a", "a1", "upgrade", 300),
            row("a", "a2", "upgrade", 300),  # one operation per instance at a time: a takes 600 s
            row("b", "b1", "upgrade", 500),
            row("c", "c1", "skip", 9999),  # not sent: does not count
            row("d", "d1", "flag", 9999),
            row("e", "e1", "unreachable", None),
        ]
        plan = PlanResult(rows=rows, rate_per_s=1.0)
        assert plan.estimate_s() == pytest.approx(3 + 600)
        assert PlanResult(rows=rows, rate_per_s=0.5).estimate_s() == pytest.approx(6 + 600)

    def test_unknown_duration_counts_only_the_sending(self) -> None:
        plan = PlanResult(
            rows=[row("a", "a1", "upgrade", None), row("b", "b1", "upgrade", None)], rate_per_s=2.0
        )
        assert plan.estimate_s() == pytest.approx(1.0)

    def test_nothing_to_upgrade(self) -> None:
        assert PlanResult(rows=[row("a", "a1", "skip", 300)], rate_per_s=10).estimate_s() == 0
        assert PlanResult(rows=[], rate_per_s=10).estimate_s() == 0

    def test_summary_counts_and_estimate(self) -> None:
        rows = [row("a", "a1", "upgrade", 300), row("b", "b1", "skip", None), row("c", "c1", "flag", None)]
        d = PlanResult(rows=rows, rate_per_s=10).as_dict()
        assert d["summary"] == {
            "upgrade": 1,
            "skip": 1,
            "flag": 1,
            "unreachable": 0,
            "estimated_duration_s": 300.1,
        }
        assert [p["verdict"] for p in d["proxies"]] == ["upgrade", "skip", "flag"]
        assert d["proxies"][0]["proxy_id"] == "a1" and d["proxies"][0]["current_version"] == SOURCE
