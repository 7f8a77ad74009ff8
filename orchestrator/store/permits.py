"""Run-wide send permits on PostgreSQL (``send_log``): at most ``count`` call starts in any window of the
period and at most ``cap`` permits held at once, across every process of a run.

The window log and the in-flight slots live in ``send_log``; the run's advisory lock serialises the
check-and-insert across processes, and time is the database server's, so workers on hosts with drifting
clocks share one window. Old rows are pruned as the window moves on (docs/postgres.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from orchestrator.store.jobs import RUN_LOCK
from orchestrator.store.sql import Tx, aware, in_clause

# The wait answered when the window has room but ``cap`` permits are held (seconds): no release is seen
# before the ask or release that carries it commits, so the asker looks again after this long.
CAP_FULL_RETRY_S = 0.02

# The permits of a run still held: read by every check under the run's lock. The partial index
# ix_send_log_held (migration 0007) holds only the rows not marked done: the held ones (at most the run's
# concurrency) and the few whose holder died holding them (their lease ran out), so the count does not
# grow with the starts the log keeps for the window.
HELD_COUNT = (
    "SELECT count(*) FROM send_log WHERE run_id = :run AND done_at IS NULL AND lease_expires_at > :now"
)


class PermitOps:
    """Mixin of ``JobStore``: send permits."""

    async def _submit(
        self, op: Any, *, urgent: bool = False, run_lock: bool = False
    ) -> Any:  # provided by JobStore
        raise NotImplementedError

    async def try_send_slots(
        self,
        run_id: int,
        *,
        worker_id: str,
        count: int,
        period: float,
        cap: int,
        lease_s: float,
        margin: float = 0.0,
        want: int = 1,
        release: Sequence[int] = (),
    ) -> tuple[list[int], float]:
        """One attempt at up to ``want`` permits: (their slot ids, 0) or ([], seconds to wait). The window
        spans ``period + margin``: a permit is stamped before its commit and its send, and the margin
        absorbs how much later one send leaves than another. Callers ask for as many permits as they
        have senders waiting right now, so a permit is used at once, never kept in stock.

        ``release``: permits of this run whose calls have ended, marked done in the same transaction
        (ids of another run are left alone; one already done keeps its first end). This check still
        counts them as held: the places they free are seen by every process of the run once it commits,
        not handed straight back to this caller."""

        async def check(tx: Tx) -> tuple[list[int], float]:
            # stamped when the lock is ours, not when the batch began: a permit granted after a wait on
            # the lock must not carry a stamp older than the permits granted before it
            now = await tx.lock_run(RUN_LOCK + run_id)
            window_start = now - timedelta(seconds=period + margin)
            params: dict[str, Any] = {
                "run": run_id,
                "ws": tx.ts(window_start),
                "now": tx.ts(now),
                "me": worker_id,
                "until": tx.ts(now + timedelta(seconds=lease_s)),
                "want": want,
                "count": count,
                "cap": cap,
            }
            if tx.dialect == "postgresql":
                # the releases, the check and the grant in one round trip (a statement after the lock's,
                # so its snapshot sees every permit the lock's previous holder committed); the statement's
                # counts see the rows its releases mark done as they were, held
                row = await tx.fetchone(
                    "WITH rel AS (UPDATE send_log SET done_at = :now WHERE id = ANY(CAST(:rel AS bigint[]))"
                    " AND run_id = :run AND done_at IS NULL RETURNING id),"
                    " c AS (SELECT (SELECT count(*) FROM send_log WHERE run_id = :run AND at > :ws) AS w,"
                    f" ({HELD_COUNT}) AS h),"
                    " ins AS (INSERT INTO send_log (run_id, at, worker, lease_expires_at)"
                    " SELECT :run, :now, :me, :until FROM c,"
                    " generate_series(1, LEAST(:want, :count - c.w, :cap - c.h)) RETURNING id)"
                    " SELECT c.w, (SELECT array_agg(id ORDER BY id) FROM ins) FROM c",
                    {**params, "rel": [int(i) for i in release]},
                )
                assert row is not None
                in_window, granted = int(row[0]), [int(x) for x in row[1] or ()]
                if granted:
                    return granted, 0.0
            else:
                row = await tx.fetchone(
                    "SELECT count(*) FROM send_log WHERE run_id = :run AND at > :ws", params
                )
                in_window = int(row[0]) if row else 0
            if in_window >= count:
                oldest = await tx.fetchone(
                    "SELECT at FROM send_log WHERE run_id = :run AND at > :ws"
                    " ORDER BY at LIMIT 1 OFFSET :skip",
                    {**params, "skip": in_window - count},
                )
                at = aware(oldest[0]) if oldest else None
                wait = (at - window_start).total_seconds() if at is not None else 0.01
                return [], max(0.001, wait)
            if tx.dialect == "postgresql":
                return [], CAP_FULL_RETRY_S  # the window had room: the cap was full
            r = await tx.fetchone(HELD_COUNT, params)
            room = min(want, count - in_window, cap - (int(r[0]) if r else 0))
            if room <= 0:
                return [], CAP_FULL_RETRY_S
            rows = await tx.fetch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :k)"
                " INSERT INTO send_log (run_id, at, worker, lease_expires_at)"
                " SELECT :run, :now, :me, :until FROM n RETURNING id",
                {**params, "k": room},
            )
            return [int(x[0]) for x in rows], 0.0

        async def op(tx: Tx) -> tuple[list[int], float]:
            answer = await check(tx)
            if tx.dialect != "postgresql" and release:
                # after the check, as PostgreSQL's snapshot has it (never a permit this check granted)
                await _mark_done(tx, [i for i in release if i not in answer[0]], run_id)
            return answer

        result: tuple[list[int], float] = await self._submit(op, run_lock=True)
        return result

    async def try_send_slot(
        self,
        run_id: int,
        *,
        worker_id: str,
        count: int,
        period: float,
        cap: int,
        lease_s: float,
        margin: float = 0.0,
    ) -> tuple[int | None, float]:
        """One permit (see ``try_send_slots``): (slot id, 0) or (None, seconds to wait)."""
        ids, wait = await self.try_send_slots(
            run_id, worker_id=worker_id, count=count, period=period, cap=cap, lease_s=lease_s, margin=margin
        )
        return (ids[0], 0.0) if ids else (None, wait)

    async def release_send_slots(self, slot_ids: list[int]) -> None:
        """Mark permits done (their calls answered), in one transaction (a statement per 500 ids)."""
        if not slot_ids:
            return

        async def op(tx: Tx) -> None:
            await _mark_done(tx, slot_ids)

        await self._submit(op)

    async def release_send_slot(self, slot_id: int) -> None:
        """Mark one permit done (see ``release_send_slots``)."""
        await self.release_send_slots([slot_id])

    async def prune_send_log(self, run_id: int, keep_s: float) -> int:
        """Delete permits that ended and left the window long ago (older than ``keep_s`` seconds)."""

        async def op(tx: Tx) -> int:
            return await tx.execute(
                "DELETE FROM send_log WHERE run_id = :run AND at < :before AND done_at IS NOT NULL",
                {"run": run_id, "before": tx.ts(tx.now - timedelta(seconds=keep_s))},
            )

        result: int = await self._submit(op)
        return result


async def _mark_done(tx: Tx, slot_ids: list[int], run_id: int | None = None) -> None:
    """Mark permits done now (a statement per 500 ids), only ``run_id``'s when given; one already done
    keeps its first end."""
    only_run = "" if run_id is None else " AND run_id = :run"
    for i in range(0, len(slot_ids), 500):
        sql, params = in_clause("s", slot_ids[i : i + 500])
        await tx.execute(
            f"UPDATE send_log SET done_at = :now WHERE id IN {sql} AND done_at IS NULL{only_run}",
            {"now": tx.ts(tx.now), "run": run_id, **params},
        )
