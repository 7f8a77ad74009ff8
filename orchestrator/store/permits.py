"""Run-wide send permits on PostgreSQL (``send_log``): at most ``count`` call starts in any window of the
period and at most ``cap`` permits held at once, across every process of a run.

The window log and the in-flight slots live in ``send_log``; the run's advisory lock serialises the
check-and-insert across processes, and time is the database server's, so workers on hosts with drifting
clocks share one window. Old rows are pruned as the window moves on (docs/postgres.md).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from orchestrator.store.jobs import RUN_LOCK
from orchestrator.store.sql import Tx, aware


class PermitOps:
    """Mixin of ``JobStore``: send permits."""

    async def _submit(self, op: Any, *, urgent: bool = False) -> Any:  # provided by JobStore
        raise NotImplementedError

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
        """One attempt at a permit: (slot id, 0) or (None, seconds to wait). The window spans ``period +
        margin``: a permit is stamped before its commit and its send, and the margin absorbs how much later
        one send leaves than another."""

        async def op(tx: Tx) -> tuple[int | None, float]:
            if tx.dialect == "postgresql":
                await tx.execute("SELECT pg_advisory_xact_lock(:k)", {"k": RUN_LOCK + run_id})
            now = tx.now
            window_start = now - timedelta(seconds=period + margin)
            starts = [
                aware(r[0])
                for r in await tx.fetch(
                    "SELECT at FROM send_log WHERE run_id = :run AND at > :ws ORDER BY at",
                    {"run": run_id, "ws": tx.ts(window_start)},
                )
            ]
            if len(starts) >= count:
                oldest = starts[len(starts) - count]
                assert oldest is not None
                return None, max(0.001, (oldest - window_start).total_seconds())
            r = await tx.fetchone(
                "SELECT count(*) FROM send_log WHERE run_id = :run AND done_at IS NULL AND lease_expires_at > :now",
                {"run": run_id, "now": tx.ts(now)},
            )
            if r is not None and int(r[0]) >= cap:
                return None, 0.02
            row = await tx.fetchone(
                "INSERT INTO send_log (run_id, at, worker, lease_expires_at) VALUES (:run, :now, :me, :until)"
                " RETURNING id",
                {
                    "run": run_id,
                    "now": tx.ts(now),
                    "me": worker_id,
                    "until": tx.ts(now + timedelta(seconds=lease_s)),
                },
            )
            assert row is not None
            return int(row[0]), 0.0

        result: tuple[int | None, float] = await self._submit(op, urgent=True)
        return result

    async def release_send_slot(self, slot_id: int) -> None:
        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE send_log SET done_at = :now WHERE id = :id", {"now": tx.ts(tx.now), "id": slot_id}
            )

        await self._submit(op)

    async def prune_send_log(self, run_id: int, keep_s: float) -> int:
        """Delete permits that ended and left the window long ago (older than ``keep_s`` seconds)."""

        async def op(tx: Tx) -> int:
            return await tx.execute(
                "DELETE FROM send_log WHERE run_id = :run AND at < :before AND done_at IS NOT NULL",
                {"run": run_id, "before": tx.ts(tx.now - timedelta(seconds=keep_s))},
            )

        result: int = await self._submit(op)
        return result
