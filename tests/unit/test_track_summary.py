"""Where a job's workflows stand (``orchestrator.steps.track``): the pure summary the track step acts on
(``summarize``) and the round of workflows it judges (``current_round``). No network, no database.

Since the new core ``summarize`` takes no attempt id: every accepted workflow it is given counts, and
``completed`` lists the completed workflows instead of counting them. Which attempt's workflows are judged
is ``current_round``'s answer (the latest accepted attempt's, plus rows without an attempt): the old
``summarize(rows, attempt_id)`` is ``summarize(current_round(rows))`` now, except that rows without an
attempt always count (they were the fallback only when the attempt had no row).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orchestrator.steps.track import FINAL, Progress, current_round, summarize
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


def judged(rows: list[WorkflowRow]) -> Progress:
    """What the track step judges: the summary of the current round."""
    return summarize(current_round(rows))


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

    def test_every_row_given_counts_whatever_its_attempt(self) -> None:
        # changed on purpose: the summary no longer filters by attempt (current_round does)
        old_failed, current = wf(1, "Failed"), wf(2, "Running")
        p = summarize([old_failed, current])
        assert p.open == (current,) and p.failed == (old_failed,) and p.completed == ()

    def test_rejected_items_and_missing_ids_are_not_followed(self) -> None:
        rows = [wf(1, None, state="REJECT"), wf(1, None, workflow_id=None), wf(1, "Completed")]
        p = summarize(rows)
        assert p.open == () and p.failed == () and p.completed == (rows[2],)

    def test_nothing_to_follow(self) -> None:
        p = summarize([])
        assert p.open == () and p.failed == () and p.completed == ()


class TestCurrentRound:
    def test_only_the_current_attempt_counts(self) -> None:
        old_failed = wf(1, "Failed")
        current = wf(2, "Running")
        p = judged([old_failed, current])
        assert p.open == (current,) and p.failed == () and p.completed == ()

    def test_an_earlier_attempts_failure_does_not_fail_the_resend(self) -> None:
        # attempt 1's workflow failed, the job was re-queued (`retry --flagged`) or retried by a rule, and
        # attempt 2's workflow completed: the old failure was decided on already
        old_failed, done = wf(1, "Failed"), wf(2, "Completed")
        p = judged([old_failed, done])
        assert p.open == () and p.failed == () and p.completed == (done,)
        assert current_round([old_failed, done]) == [done]

    def test_a_failure_of_the_latest_attempt_counts(self) -> None:
        old_failed, new_failed = wf(1, "Failed"), wf(2, "Canceled")
        assert judged([old_failed, new_failed]).failed == (new_failed,)

    def test_every_node_workflow_of_the_latest_attempt_counts(self) -> None:
        rows = [wf(1, "Failed"), wf(2, "Completed"), wf(2, "Running"), wf(2, None, state="REJECT")]
        assert current_round(rows) == rows[1:]
        p = judged(rows)
        assert p.completed == (rows[1],) and p.open == (rows[2],) and p.failed == ()

    def test_a_rejected_item_of_a_later_attempt_does_not_start_a_round(self) -> None:
        # only an accepted workflow of a later attempt makes the earlier round history
        old_failed = wf(1, "Failed")
        rows = [old_failed, wf(2, None, state="REJECT")]
        assert judged(rows).failed == (old_failed,)

    def test_reconciled_workflow_counts_with_its_attempt(self) -> None:
        found = wf(3, "Running", source="reconciled")
        p = judged([wf(1, "Failed"), found])
        assert p.open == (found,) and p.failed == ()

    def test_no_row_for_an_attempt_falls_back_to_every_accepted_row(self) -> None:
        rows = [wf(None, "Running"), wf(None, "Completed"), wf(None, None, state="REJECT")]
        assert current_round(rows) == rows
        p = judged(rows)
        assert p.open == (rows[0],) and p.completed == (rows[1],) and p.failed == ()

    def test_rows_without_an_attempt_stay_in_every_round(self) -> None:
        # changed: the old summary used them only when the attempt had no row of its own
        loose, current = wf(None, "Running"), wf(2, "Completed")
        assert current_round([loose, current]) == [loose, current]
        assert judged([loose, current]).open == (loose,)

    def test_nothing_to_follow(self) -> None:
        assert current_round([]) == []
        assert judged([]) == Progress(open=(), failed=(), completed=())
