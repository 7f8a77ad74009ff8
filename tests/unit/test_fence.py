"""The send fence (``runtime.LeaseKeeper``): a call leaves only under the claim its intent was recorded
under, measured on the process's own clock (issue 11 kind 1; the real-fault tests are in
tests/integration/test_faults_send.py)."""

from __future__ import annotations

from typing import Any

from orchestrator.runtime import LeaseKeeper, Runtime


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_claim_holds_until_its_lease_less_the_margin_and_a_lapse_is_for_good() -> None:
    mono = Clock()
    keeper = LeaseKeeper(10.0, margin_s=1.0, mono=mono)
    keeper.claimed([7], submitted=0.0)
    mono.t = 8.9
    assert keeper.holds(7)
    keeper.renewed([7], submitted=8.9)  # confirmed in time: extended
    mono.t = 17.0
    assert keeper.holds(7)
    mono.t = 18.95  # past 8.9 + 10 - 1
    assert not keeper.holds(7)
    mono.t = 25.0
    keeper.renewed([7], submitted=25.0)  # too late: a lapsed claim is void for good
    assert not keeper.holds(7)


def test_claiming_the_job_again_does_not_reopen_the_fence_of_a_stale_call() -> None:
    """Frozen past its lease, the job taken over and put back, the same process claims it again: the call
    recorded under the first claim must still not leave; the new claim's call may."""
    mono = Clock()
    keeper = LeaseKeeper(10.0, margin_s=1.0, mono=mono)
    keeper.claimed([7], submitted=0.0)
    stale = keeper.token(7)
    mono.t = 40.0
    keeper.claimed([7], submitted=40.0)
    fresh = keeper.token(7)
    assert stale is not None and fresh != stale
    assert not keeper.holds(7, stale)
    assert keeper.holds(7, fresh) and keeper.holds(7)
    keeper.dropped(7)
    assert keeper.token(7) is None and not keeper.holds(7, fresh)


class _Job:
    id = 7
    proxy_id = "p"


def _runtime(keeper: LeaseKeeper) -> Runtime:
    nothing: Any = None
    return Runtime(
        store=nothing, cloud=nothing, limiter=nothing, policy=nothing, options=nothing, run_id=1,
        worker_id="w", lease=keeper,
    )  # fmt: skip


def test_the_send_fence_is_the_claim_it_was_taken_under() -> None:
    mono = Clock()
    keeper = LeaseKeeper(10.0, margin_s=1.0, mono=mono)
    rt = _runtime(keeper)
    job: Any = _Job()
    keeper.claimed([7], submitted=0.0)
    fence = rt.send_fence(job)  # taken before the intent is recorded
    assert fence()
    mono.t = 40.0  # frozen while it waited for a permit
    keeper.claimed([7], submitted=40.0)  # this process claims the job again
    assert not fence(), "a stale call left under a later claim"
    assert rt.send_fence(job)()
    rt.request_stop("stop")
    assert not rt.send_fence(job)(), "no new upgrade after a stop"
