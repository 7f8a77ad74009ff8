"""The whole engine (``Engine(rt).run()``) over a small fleet on virtual time against the in-process fake.

Issue 13's run-wide controls as the cloud sees them (the fake's call log and the fleet's workflows): the
availability guard never lets two proxies of one instance be upgraded at once, a wave starts only after
every job of the previous one ended, the failure breaker halts (exit 4) with no upgrade call after the
failure that tripped it, and a window's cutoff stops new calls while tracking goes on (exit 3, paused).
Hours of window pass in well under a second of wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cloud.fake import Fault
from orchestrator.engine import Engine
from orchestrator.errors import EXIT_HALTED, EXIT_STOPPED, EXIT_USAGE
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from tests import simlog
from tests.unit.steps_kit import (
    EPOCH,
    INST_A,
    INST_B,
    INST_C,
    P1,
    P2,
    P3,
    P4,
    P5,
    P6,
    SUBNET_MSG,
    Bench,
    at,
    make_options,
    proxy,
    run_bench,
)

S = JobStatus
PROXIES = (P1, P2, P3, P4, P5, P6)
# one instance per proxy: only the controls under test hold calls back, not the availability guard
SPREAD = {f"inst-{n}": [proxy(p)] for n, p in enumerate(PROXIES, start=1)}


def seconds(t: datetime) -> float:
    """A job table time as loop seconds (the bench's clocks agree when there is no skew)."""
    return t.timestamp() - EPOCH


def call_times(b: Bench) -> dict[str, float]:
    """When each proxy's (single) upgrade call reached the cloud, in loop seconds."""
    out: dict[str, float] = {}
    for r in b.upgrade_calls():
        assert r["proxy_id"] not in out, f"{r['proxy_id']} was sent twice"
        out[r["proxy_id"]] = r["received_at"] - EPOCH
    return out


def spin_free(b: Bench, virtual_s: float) -> None:
    """The feeder never spins on the job table: a few transactions per virtual second at most (a tick,
    a heartbeat, the steps' own), where a 20 ms busy wait would commit hundreds."""
    batches = b.store.writer.stats.batches
    assert batches < 6 * virtual_s + 200, f"{batches} job-table commits in {virtual_s:.0f} virtual seconds"


# -------------------------------------------------------------------------------- the availability guard
def test_a_small_fleet_runs_to_the_end_never_upgrading_two_proxies_of_one_instance_at_once(
    tmp_path: Path,
) -> None:
    fleet = {INST_A: [proxy(P1), proxy(P2), proxy(P3)], INST_B: [proxy(P4), proxy(P5)], INST_C: [proxy(P6)]}

    async def body(b: Bench) -> None:
        # P1's first call is throttled: its retry falls due while P2 holds the instance for a minute
        b.inject("upgrade", Fault.http(429, "APIGW.0308"), pid=P1)
        result = await b.engine()
        assert (result.finished, result.exit_code, result.stop_reason) == (True, None, None)
        jobs = await b.store.jobs(b.run_id)
        assert {j.proxy_id: j.status for j in jobs} == dict.fromkeys(PROXIES, S.SUCCEEDED)
        assert sorted(r["proxy_id"] for r in b.upgrade_calls()) == sorted([P1, *PROXIES])
        assert [r["error_code"] for r in b.upgrade_calls() if r["http_status"] != 200] == ["APIGW.0308"]
        # the cloud never saw two workflows of one instance run at once: the guard holds an instance from
        # the call until the workflow ended, not only until the call returned
        by_instance: dict[str, list[Any]] = defaultdict(list)
        for wf in b.fleet.workflows.values():
            by_instance[wf.proxy.instance.id].append(wf)
        for instance, wfs in by_instance.items():
            wfs.sort(key=lambda w: w.created_at)
            for before, after in itertools.pairwise(wfs):
                assert after.created_at >= before.ends_at, instance
        assert len(by_instance[INST_A]) == 3
        assert await b.workflow_ids(P1) == [w.id for w in b.fleet.workflows.values() if w.proxy.spec.id == P1]
        spin_free(b, b.now())

    run_bench(tmp_path, body, fleet=fleet, options=make_options(concurrency=6, per_instance=1))


def test_without_waiting_for_workflows_the_run_ends_at_accept(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        result = await b.engine()
        assert result.finished
        assert {j.status for j in await b.store.jobs(b.run_id)} == {S.ACCEPTED}
        assert b.calls("job") == [] and len(b.upgrade_calls()) == 6

    run_bench(tmp_path, body, fleet=SPREAD, options=make_options(wait=False, concurrency=6))


def test_claims_come_in_batches_of_at_least_half_a_worker_pool(tmp_path: Path) -> None:
    """The feeder claims again only once fewer than ``concurrency`` jobs wait in its queue, when at least
    ``concurrency + 1`` more fit under its hold (two pools of ``2 x concurrency`` workers): every claim
    that finds work takes that many or all that is left. A claim walks past the pending siblings of busy
    instances, so claiming a few jobs at a time would pay that walk again and again."""
    fleet = {f"inst-{n:03d}": [proxy(f"{n:032x}po01")] for n in range(120)}
    concurrency = 3
    sizes: list[int] = []

    async def body(b: Bench) -> None:
        claim = b.store.claim

        async def counted(*args: Any, **kwargs: Any) -> Any:
            got = await claim(*args, **kwargs)
            if got.jobs:
                sizes.append(len(got.jobs))
            return got

        b.store.claim = counted  # type: ignore[method-assign]
        result = await b.engine()
        assert result.finished
        assert len(b.upgrade_calls()) == 120

    run_bench(tmp_path, body, fleet=fleet, options=make_options(wait=False, concurrency=concurrency))
    assert sum(sizes) == 120
    assert all(n > concurrency for n in sizes[:-1]), sizes


def test_a_full_queue_does_not_wake_the_feeder_for_every_job_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a pool's worth of jobs waits in the queue the feeder cannot claim, so a worker taking a job or
    a job ending does not wake it (each wake cost two tasks and a timer, at 100 ms of latency one per
    call): it looks again when the queue drains below a pool, or when the run's controls go stale."""
    from orchestrator.engine import Engine

    fleet = {f"inst-{n:03d}": [proxy(f"{n:032x}po01")] for n in range(120)}
    waits: list[int] = []
    wait_for_room = Engine._wait_for_room

    async def counted(self: Engine) -> None:
        waits.append(self._queue.qsize())
        await wait_for_room(self)

    monkeypatch.setattr(Engine, "_wait_for_room", counted)

    async def body(b: Bench) -> None:
        result = await b.engine()
        assert result.finished
        assert len(b.upgrade_calls()) == 120

    run_bench(tmp_path, body, fleet=fleet, options=make_options(wait=False, concurrency=3))
    assert len(waits) <= 40, (len(waits), waits)  # 26 here; 58 when every job taken woke it


def test_a_job_made_due_by_an_answer_is_taken_at_once_not_at_the_feeders_next_tick(tmp_path: Path) -> None:
    """An answer whose commit makes its job due again (a gateway page: reconcile, due at once) wakes the
    feeder even when that commit lands while the feeder awaits the job table (its ``next_due`` read rides
    in the same batch): the wake-up is not cleared away before the feeder's wait, which would leave the
    job for the whole idle tick (30 s here)."""

    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.gateway(502), pid=P1)
        # the interleaving that lost the wake-up: the feeder awaits the table while the answer commits
        committed = asyncio.Event()
        record_answer, next_due = b.store.record_answer, b.store.next_due

        def recorded(*args: Any, **kwargs: Any) -> Any:
            fut = record_answer(*args, **kwargs)
            fut.add_done_callback(lambda _f: committed.set())
            return fut

        async def while_the_answer_commits(*args: Any, **kwargs: Any) -> Any:
            await committed.wait()
            return await next_due(*args, **kwargs)

        b.store.record_answer = recorded  # type: ignore[method-assign]
        b.store.next_due = while_the_answer_commits  # type: ignore[method-assign]
        result = await asyncio.wait_for(Engine(b.rt, idle_s=30.0).run(), 3600)
        assert result.finished
        (sent,) = b.upgrade_calls(P1)
        # reconcile's first read of the cloud (its recent jobs, the proxy's version)
        reads = [r["received_at"] for r in b.cloud.log if r["seq"] > sent["seq"]]
        assert reads, b.cloud.log
        assert reads[0] - sent["received_at"] < 5.0, (reads[0] - sent["received_at"], b.moves(P1))

    run_bench(tmp_path, body, fleet={INST_A: [proxy(P1)]}, options=make_options(wait=False, concurrency=2))


def test_answers_that_prove_nothing_in_a_run_are_reconciled_never_resent_and_every_workflow_recorded(
    tmp_path: Path,
) -> None:
    """Issue 11's acceptance on the fake's log: no upgrade call after an accepted one, and every workflow
    id the cloud issued is in the job table, with lost, gateway and malformed answers mixed in a run."""
    faults = {
        P1: Fault.lost(),
        P2: Fault.gateway(502),
        P3: Fault.null_workflow_id(),
        P4: Fault.lost(timeout=True),
        P5: Fault.lower_case_state(),
    }

    async def body(b: Bench) -> None:
        for pid, fault in faults.items():
            b.inject("upgrade", fault, pid=pid)
        result = await b.engine()
        assert result.finished
        assert {j.status for j in await b.store.jobs(b.run_id)} == {S.SUCCEEDED}
        assert simlog.sent_after_applied(b.cloud.log) == {}
        assert simlog.applied_per_proxy(b.cloud.log) == dict.fromkeys(PROXIES, 1)
        recorded = {w for p in PROXIES for w in await b.workflow_ids(p)}
        assert simlog.created_workflow_ids(b.cloud.log) == recorded == set(b.issued())
        sources = {p: {w.source for w in await b.workflows(p)} for p in PROXIES}
        assert sources == {**{p: {"reconciled"} for p in faults}, P6: {"answer"}}

    run_bench(tmp_path, body, fleet=SPREAD, options=make_options(concurrency=6))


# ------------------------------------------------------------------------------------------------ waves
@pytest.mark.parametrize("pause", ["0s", "10m"])
def test_a_wave_starts_only_after_every_job_of_the_previous_wave_ended(tmp_path: Path, pause: str) -> None:
    fleet = {**SPREAD, "inst-2": [proxy(P2, reject=SUBNET_MSG)]}  # a flagged job ends its wave too

    async def body(b: Bench) -> None:
        result = await b.engine()
        assert result.finished
        jobs = {j.proxy_id: j for j in await b.store.jobs(b.run_id)}
        assert [jobs[p].wave for p in PROXIES] == [1, 2, 2, 3, 3, 3]
        assert jobs[P2].status is S.FLAGGED
        assert all(jobs[p].status is S.SUCCEEDED for p in PROXIES if p != P2)
        sent = call_times(b)
        gap = 600.0 if pause == "10m" else 0.0
        for wave in (1, 2):
            ended = max(seconds(j.updated_at) for j in jobs.values() if j.wave == wave)
            first_next = min(sent[p] for p, j in jobs.items() if j.wave == wave + 1)
            assert first_next >= ended + gap - 0.01, f"wave {wave + 1} started before wave {wave} ended"
        opened = [f["wave"] for e, f in b.events.seen if e == "wave.opened"]
        assert opened == [2, 3]
        waiting = b.events.names().count("run.waiting")
        assert waiting <= (2 * 600 + 20 if gap else 0)  # waited on the tick, never in a 20 ms loop
        spin_free(b, b.now())

    run_bench(
        tmp_path,
        body,
        fleet=fleet,
        options=make_options(waves="1,2,100%", pause_between=pause, concurrency=6),
    )


# ---------------------------------------------------------------------------------------------- breaker
FAILING = {f"inst-{n}": [proxy(p, workflow="fail")] for n, p in enumerate(PROXIES, start=1)}
# Concurrency bounds steps, not upgrades in flight: what makes failures known before more calls leave is
# the availability guard (one instance) or canary waves (issue 13: all 30 were sent within 3 s).
BREAKER_CASES = {
    "one instance": ({INST_A: [proxy(p, workflow="fail") for p in PROXIES]}, {}, 2),
    "waves 1,2,100%": (FAILING, {"waves": "1,2,100%"}, 3),
}


@pytest.mark.parametrize(("fleet", "extra", "calls"), list(BREAKER_CASES.values()), ids=list(BREAKER_CASES))
def test_the_breaker_halts_with_no_upgrade_call_after_the_failure_that_tripped_it(
    tmp_path: Path, fleet: dict[str, Any], extra: dict[str, Any], calls: int
) -> None:
    async def body(b: Bench) -> None:
        result = await b.engine()
        assert (result.finished, result.exit_code, result.run_status) == (False, EXIT_HALTED, "halted")
        assert result.stop_reason is not None and result.stop_reason.startswith("halted: ")
        assert "a person must decide" in result.stop_reason
        jobs = await b.store.jobs(b.run_id)
        failed = sorted((j for j in jobs if j.counts_failure), key=lambda j: j.updated_at)
        assert len(failed) == calls and all(j.rule == "default:workflow-failed" for j in failed)
        tripped_at = seconds(failed[1].updated_at)  # --max-failures 1: the second failure exceeds it
        assert all(t <= tripped_at for t in call_times(b).values())
        # in-flight work was tracked to its end; what never started is still pending for a person
        assert sorted(j.status for j in jobs) == sorted([S.FLAGGED] * calls + [S.PENDING] * (6 - calls))
        assert len(b.upgrade_calls()) == calls
        state = await b.store.run_state(b.run_id)
        assert (state.failures, state.in_flight) == (calls, 0)

    run_bench(tmp_path, body, fleet=fleet, options=make_options(max_failures="1", concurrency=3, **extra))


def test_failures_the_policy_does_not_count_never_trip_the_breaker(tmp_path: Path) -> None:
    fleet = {f"inst-{n}": [proxy(p, reject=SUBNET_MSG)] for n, p in enumerate(PROXIES, start=1)}

    async def body(b: Bench) -> None:
        result = await b.engine()
        assert (result.finished, result.exit_code) == (True, None)
        assert {(j.status, j.counts_failure) for j in await b.store.jobs(b.run_id)} == {(S.FLAGGED, False)}
        assert len(b.upgrade_calls()) == 6

    run_bench(tmp_path, body, fleet=fleet, options=make_options(max_failures="1", concurrency=2))


# ----------------------------------------------------------------------------------------------- window
def test_after_the_cutoff_no_upgrade_starts_tracking_goes_on_and_the_run_pauses(tmp_path: Path) -> None:
    window = f"{at(0).isoformat()}/PT10M"
    fleet = {INST_A: [proxy(p) for p in PROXIES]}  # one instance: one proxy after the other

    async def body(b: Bench) -> None:
        result = await b.engine()
        jobs = await b.store.jobs(b.run_id)
        not_started = [j for j in jobs if j.status is S.PENDING]
        assert (result.exit_code, result.run_status) == (EXIT_STOPPED, "paused")
        count = f"{len(not_started)} {'proxy' if len(not_started) == 1 else 'proxies'}"
        assert result.stop_reason == (
            f"window closed: {count} not started; resume in the next window (give it with resume --window)"
        )
        sent = call_times(b)
        assert 2 <= len(sent) < len(PROXIES) and all(t < 300.0 for t in sent.values())  # end - cutoff
        done = [seconds(j.updated_at) for j in jobs if j.status is S.SUCCEEDED]
        assert len(done) == len(sent) and max(done) > 300.0  # tracked after the cutoff
        assert b.now() <= 600.0 + 1.0  # stopped by the window's end at the latest
        assert all(j.attempt_count == 0 for j in not_started)
        spin_free(b, b.now())

    run_bench(tmp_path, body, fleet=fleet, options=make_options(window=window, cutoff="5m"))


def test_a_workflow_still_running_at_the_windows_end_is_left_for_resume(tmp_path: Path) -> None:
    window = f"{at(0).isoformat()}/PT10M"
    fleet = {INST_A: [proxy(P1), proxy(P2)]}

    async def body(b: Bench) -> None:
        result = await b.engine()
        assert (result.exit_code, result.run_status) == (EXIT_STOPPED, "paused")
        assert result.stop_reason is not None and result.stop_reason.endswith(
            "1 upgrade still in flight, reconciled on resume"
        )
        statuses = {j.proxy_id: j.status for j in await b.store.jobs(b.run_id)}
        assert statuses == {P1: S.ACCEPTED, P2: S.PENDING}
        assert 600.0 <= b.now() <= 601.0

    run_bench(
        tmp_path,
        body,
        fleet=fleet,
        options=make_options(window=window, cutoff="5m"),
        scenario_extra={"workflow": {"pending_s": 5, "running_s": 900, "job_visible_after_s": 0}},
    )


def test_a_four_hour_window_with_a_30_minute_cutoff_passes_in_under_a_second(tmp_path: Path) -> None:
    """Virtual time: four hours of window, six 40-minute workflows one after the other, about 0.6 s of
    CPU here (measured as CPU time: the wall time of a shared machine varies with its load)."""
    window = f"{at(0).isoformat()}/PT4H"
    fleet = {INST_A: [proxy(p) for p in PROXIES]}
    options = make_options(
        window=window, cutoff="30m", poll_initial=60.0, poll_interval=60.0, heartbeat=30.0, lease=120.0
    )

    async def body(b: Bench) -> None:
        started = time.process_time()
        result = await b.engine(idle_s=60.0)
        cpu = time.process_time() - started
        assert (result.exit_code, result.run_status) == (EXIT_STOPPED, "paused")
        sent = call_times(b)
        assert (
            len(sent) == 6 and max(sent.values()) < 4 * 3600 - 30 * 60
        )  # the sixth starts before the cutoff
        statuses = [j.status for j in await b.store.jobs(b.run_id)]
        assert statuses == [S.SUCCEEDED] * 5 + [S.ACCEPTED]  # the last one outlives the window
        assert 4 * 3600 <= b.now() <= 4 * 3600 + 60
        assert cpu < 2.0, f"a 4-hour window took {cpu:.2f} s of CPU"

    run_bench(
        tmp_path,
        body,
        fleet=fleet,
        options=options,
        scenario_extra={"workflow": {"pending_s": 5, "running_s": 2400, "job_visible_after_s": 0}},
    )


# ------------------------------------------------------------------------------------------- stop by 401
def test_refused_credentials_stop_the_run_with_no_further_upgrade_call(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.http(401, "APIGW.0301"), pid=P3)
        result = await b.engine()
        assert (result.finished, result.exit_code) == (False, EXIT_USAGE)
        sent = call_times(b)
        assert all(t <= sent[P3] for t in sent.values())
        statuses = {j.proxy_id: j.status for j in await b.store.jobs(b.run_id)}
        assert statuses[P3] is S.RETRY_WAIT  # resendable once the credential is fixed

    run_bench(tmp_path, body, fleet=SPREAD, options=make_options(concurrency=1))


# ------------------------------------------------------------------------------------ heartbeat and fence
def test_heartbeats_keep_a_claim_good_past_its_first_lease(tmp_path: Path) -> None:
    """The upgrade waits a minute for its permit (rate 1/min: the preflight read took the first); the
    engine's heartbeat renews the claim meanwhile, so the fence lets the call leave once, at 60 s."""

    async def body(b: Bench) -> None:
        result = await b.engine()
        assert result.finished
        (call,) = b.upgrade_calls()
        assert call["received_at"] - EPOCH == pytest.approx(60.0, abs=0.5)
        assert b.cloud.not_sent == [] and "upgrade.fenced" not in b.events.names()
        assert (await b.job()).status is S.SUCCEEDED

    run_bench(tmp_path, body, options=make_options(rate="1/min", lease=30.0, heartbeat=5.0))


@pytest.mark.parametrize("wait", [False, True], ids=["stop", "wait-for-window"])
def test_a_run_started_before_its_window_stops_or_waits_for_it(tmp_path: Path, wait: bool) -> None:
    window = f"{at(7200).isoformat()}/PT1H"

    async def body(b: Bench) -> None:
        result = await b.engine(idle_s=60.0)
        if not wait:
            assert (result.exit_code, result.run_status) == (EXIT_STOPPED, "paused")
            assert result.stop_reason is not None
            assert result.stop_reason.startswith("outside the maintenance window; the next one opens ")
            assert b.cloud.log == [] and b.now() < 1.0
            return
        assert result.finished
        sent = call_times(b)
        assert len(sent) == 6 and 7200.0 <= min(sent.values()) < 7201.0
        # waited on the window's own moment, not in a 20 ms loop
        assert 0 < b.events.names().count("run.waiting") <= 7200 / 60 + 5

    run_bench(
        tmp_path, body, fleet=SPREAD, options=make_options(window=window, wait_for_window=wait, concurrency=6)
    )


async def test_defer_waits_while_more_than_concurrency_commits_pend_and_a_cancelled_caller_loses_none() -> (
    None
):
    """``Runtime.defer``: the answer's write is tracked (the engine waits for every tracked write before
    it returns) before the caller waits for room, so a caller cancelled in that wait (Ctrl-C, the drain
    timeout) loses neither the answer nor the report of its outcome (``on_commit``); the caller waits
    while more than ``concurrency`` writes are pending, and is let go when one commits; ``then`` runs once
    its write is done, and its own error becomes a ``job.error`` event."""
    nothing: Any = None
    emitted: list[tuple[str, dict[str, Any]]] = []

    class Events:
        def emit(self, event: str, **fields: Any) -> None:
            emitted.append((event, fields))

    rt = Runtime(
        store=nothing, cloud=nothing, limiter=nothing, policy=nothing, options=make_options(concurrency=2),
        run_id=1, worker_id="w", events=Events(),
    )  # fmt: skip
    ended: list[asyncio.Future[Any]] = []
    rt.on_commit = ended.append
    loop = asyncio.get_running_loop()
    commits: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(4)]
    seen: list[asyncio.Future[Any]] = []
    assert await rt.defer(commits[0], seen.append) is commits[0]
    await rt.defer(commits[1], seen.append)
    third = asyncio.ensure_future(rt.defer(commits[2], seen.append))
    await asyncio.sleep(0)
    assert not third.done(), "three writes pending at concurrency 2: the caller waits"
    assert rt.tails == set(commits[:3])
    third.cancel()
    with pytest.raises(asyncio.CancelledError):
        await third
    assert commits[2] in rt.tails, "a cancelled caller's write is still tracked"
    fourth = asyncio.ensure_future(rt.defer(commits[3]))
    await asyncio.sleep(0)
    assert not fourth.done()
    commits[0].set_result(True)
    for _ in range(3):
        await asyncio.sleep(0)
    assert seen == [commits[0]] and commits[0] not in rt.tails
    assert not fourth.done(), "still three pending"
    commits[1].set_result(False)
    for _ in range(3):
        await asyncio.sleep(0)
    assert fourth.done() and seen == commits[:2]
    commits[2].set_exception(RuntimeError("bug"))
    commits[3].set_result(True)
    for _ in range(3):
        await asyncio.sleep(0)
    assert rt.tails == set() and seen == commits[:3]
    # the cancelled caller's write is reported too (the engine stops on an outage, else job.error)
    assert ended == commits and isinstance(ended[2].exception(), RuntimeError)

    def broken(_commit: asyncio.Future[Any]) -> None:
        raise ValueError("a bug in the follow-up")

    last = loop.create_future()
    await rt.defer(last, broken)
    last.set_result(True)
    await asyncio.sleep(0)
    assert ended[-1] is last, "a follow-up that raised must not hide the write from on_commit"
    assert emitted == [("job.error", {"error": "ValueError('a bug in the follow-up')"})]
