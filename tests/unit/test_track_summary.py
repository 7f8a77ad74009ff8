"""Where a job's workflows stand (``orchestrator.steps.track.summarize``): the pure summary the track step
acts on. No network, no database.

Since the new core every accepted workflow of the job counts, whatever attempt recorded it (a reconciled
workflow and a resend's may both belong to the job): the summary no longer takes the attempt id, and
``completed`` lists the completed workflows instead of counting them. A workflow that ended without
completing under an earlier attempt was already decided on (the job was sent again after it), so it is
history, not a failure of the workflows being tracked now.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orchestrator.steps.track import FINAL, Progress, summarize
from orchestrator.store import WorkflowRow

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
        checked_at=None,
        ended_at=None,
    )


class TestSummarize:
    def test_final_statuses(self) -> None:
        assert frozenset({"Completed", "Failed", "Canceled", "Unauthorized"}) == FINAL

    def test_all_open(self) -> None:
        rows = [wf(1, None), wf(1, "Pending"), wf(1, "Running")]
        p = summarize(rows)
        assert p.open == tuple(rows) and p.failed == () and p.completed == ()

    def test_an_unknown_status_is_still_open(self) -> None:
        # a status this code does not know has not been seen to end: keep polling (poll_timeout bounds it)
        odd = wf(1, "Suspended")
        assert summarize([odd]) == Progress(open=(odd,), failed=(), completed=())

    def test_all_completed(self) -> None:
        rows = [wf(1, "Completed"), wf(1, "Completed")]
        p = summarize(rows)
        assert p.open == () and p.failed == () and p.completed == tuple(rows)

    @pytest.mark.parametrize("status", ["Failed", "Canceled", "Unauthorized"])
    def test_final_but_not_completed_is_failed(self, status: str) -> None:
        done, bad, running = wf(1, "Completed"), wf(1, status), wf(1, "Running")
        p = summarize([done, bad, running])
        assert p.failed == (bad,) and p.completed == (done,) and p.open == (running,)

    def test_every_attempts_open_workflow_counts(self) -> None:
        # changed on purpose: an earlier attempt's workflow that may still run is followed too (the
        # upgrade step never resends while one runs); the old summary looked at the latest attempt only
        old_running = wf(1, "Running")
        current = wf(2, "Running")
        p = summarize([old_running, current])
        assert p.open == (old_running, current) and p.failed == () and p.completed == ()

    def test_an_earlier_attempts_failed_workflow_is_history(self) -> None:
        # attempt 1's workflow failed, the job was retried (policy or `retry --flagged`) and attempt 2's
        # workflow runs, then completes: the old failure was decided on already and must not flag (or
        # retry) the job again once the new workflow completed
        old_failed = wf(1, "Failed")
        current = wf(2, "Running")
        p = summarize([old_failed, current])
        assert p.open == (current,) and p.failed == () and p.completed == ()
        done = wf(2, "Completed")
        p = summarize([old_failed, done])
        assert p.open == () and p.failed == () and p.completed == (done,)

    def test_a_failure_of_the_latest_attempt_counts_beside_older_history(self) -> None:
        old_failed, new_failed = wf(1, "Failed"), wf(2, "Canceled")
        p = summarize([old_failed, new_failed])
        assert p.failed == (new_failed,) and p.open == ()

    def test_rejected_items_and_missing_ids_are_not_followed(self) -> None:
        rows = [wf(1, None, state="REJECT"), wf(1, None, workflow_id=None), wf(1, "Completed")]
        p = summarize(rows)
        assert p.open == () and p.failed == () and p.completed == (rows[2],)

    def test_a_rejected_item_of_a_later_attempt_does_not_retire_older_workflows(self) -> None:
        # only an accepted workflow of a later attempt makes an earlier failure history
        old_failed = wf(1, "Failed")
        p = summarize([old_failed, wf(2, None, state="REJECT")])
        assert p.failed == (old_failed,)

    def test_reconciled_workflow_counts_with_its_attempt(self) -> None:
        found = wf(3, "Running", source="reconciled")
        p = summarize([wf(1, "Failed"), found])
        assert p.open == (found,) and p.failed == ()

    def test_every_accepted_row_without_an_attempt_counts(self) -> None:
        rows = [wf(None, "Running"), wf(None, "Completed"), wf(None, None, state="REJECT")]
        p = summarize(rows)
        assert p.open == (rows[0],) and p.completed == (rows[1],) and p.failed == ()
        failed = wf(None, "Failed")
        assert summarize([*rows, failed]).failed == (failed,)

    def test_nothing_to_follow(self) -> None:
        p = summarize([])
        assert p.open == () and p.failed == () and p.completed == ()
