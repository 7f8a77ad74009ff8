"""Runs: creating one with its jobs (atomically with its proxy hold and its runner), finding runs, and the
run-wide state the controls read (window, waves, breaker)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orchestrator.store.events as events
from orchestrator.states import TERMINAL, JobStatus, RunStatus
from orchestrator.store.decode import RUN_COLS, run_row
from orchestrator.store.rows import NewJob, Registration, RunRow, RunState
from orchestrator.store.sql import Tx, aware, from_json
from orchestrator.store.workers import lock_registry, register_in

_JOB_INSERT = (
    "INSERT INTO jobs (run_id, project_id, instance_id, proxy_id, name, region, endpoint, x_language,"
    " source_version, target_version, inventory_line, status, attempt_count, read_failures, wave,"
    " counts_failure, created_at, updated_at) VALUES (:run_id, :project_id, :instance_id, :proxy_id, :name,"
    " :region, :endpoint, :x_language, :source_version, :target_version, :line, 'pending', 0, 0, :wave, :f,"
    " :now, :now)"
)
_BATCH = 1000

# (job id, instance key, proxy key) in inventory order -> job ids in wave order, and the wave sizes
WavePlanner = Callable[[list[tuple[int, str, str]]], tuple[list[int], list[int]]]


class UnfinishedRun(RuntimeError):
    """The inventory has an unfinished run; the caller decides (resume it, or start a new run)."""

    def __init__(self, run: RunRow) -> None:
        self.run = run
        super().__init__(f"run {run.id} ({run.name}) of this inventory is {run.status.value}")


def _job_params(run_id: int, j: NewJob, tx: Tx, wave: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "project_id": j.project_id,
        "instance_id": j.instance_id,
        "proxy_id": j.proxy_id,
        "name": j.name,
        "region": j.region,
        "endpoint": j.endpoint,
        "x_language": j.x_language,
        "source_version": j.source_version,
        "target_version": j.target_version,
        "line": j.line,
        "wave": wave,
        "f": False,
        "now": tx.ts(tx.now),
    }


async def insert_jobs(tx: Tx, run_id: int, jobs: Iterable[NewJob], wave: int = 1) -> int:
    """Insert ``jobs`` as pending rows of the run in ``wave``, 1000 rows a statement (the iterable is
    consumed as it goes); returns how many were inserted."""
    n = 0
    rows: list[dict[str, Any]] = []
    for j in jobs:
        rows.append(_job_params(run_id, j, tx, wave))
        if len(rows) >= _BATCH:
            await tx.executemany(_JOB_INSERT, rows)
            n += len(rows)
            rows = []
    if rows:
        await tx.executemany(_JOB_INSERT, rows)
        n += len(rows)
    return n


async def assign_waves(tx: Tx, run_id: int, planner: WavePlanner) -> list[int]:
    """Decide wave membership once, store it per job; returns the wave sizes."""
    rows = await tx.fetch(
        "SELECT id, project_id || '/' || instance_id, proxy_id FROM jobs WHERE run_id = :run ORDER BY id",
        {"run": run_id},
    )
    ordered, sizes = planner([(int(r[0]), str(r[1]), str(r[2])) for r in rows])
    updates: list[dict[str, Any]] = []
    pos = 0
    for wave, size in enumerate(sizes, start=1):
        for job_id in ordered[pos : pos + size]:
            updates.append({"w": wave, "id": job_id})
        pos += size
    for i in range(0, len(updates), _BATCH):
        await tx.executemany("UPDATE jobs SET wave = :w WHERE id = :id", updates[i : i + _BATCH])
    return sizes


class RunOps:
    """Mixin of ``JobStore``: runs."""

    async def _submit(
        self, op: Any, *, urgent: bool = False, run_lock: bool = False
    ) -> Any:  # provided by JobStore
        raise NotImplementedError

    async def create_run(
        self,
        *,
        name: str,
        inventory_path: str,
        inventory_sha256: str,
        options: Mapping[str, Any],
        jobs: Callable[[], Iterable[NewJob]],
        runner_id: str,
        lease_s: float,
        refuse_unfinished: bool = True,
        waves: WavePlanner | None = None,
    ) -> tuple[RunRow, Registration]:
        """The run, all its jobs, its waves and its runner's registration in ONE transaction: a bad row,
        an unfinished run of the same inventory (``UnfinishedRun``, when ``refuse_unfinished``), another
        live run holding these proxies (``ProxiesHeld``) leave nothing written. ``jobs()`` gives a fresh
        iterator each time the transaction runs (it is replayed after a database outage) and is consumed
        inside it (stream it: a 100k inventory is never held in memory)."""

        async def op(tx: Tx) -> tuple[RunRow, Registration]:
            await lock_registry(tx)
            if refuse_unfinished:
                row = await tx.fetchone(
                    f"SELECT {RUN_COLS} FROM runs WHERE inventory_path = :p AND status != 'finished'"
                    " ORDER BY id DESC LIMIT 1",
                    {"p": inventory_path},
                )
                if row is not None:
                    raise UnfinishedRun(run_row(row))
            found = await tx.fetchone(
                "INSERT INTO runs (name, inventory_path, inventory_sha256, status, created_at, options,"
                " wave_open, failures_acked) VALUES (:name, :path, :sha, 'created', :now, :opts, 1, 0)"
                " RETURNING id",
                {
                    "name": name,
                    "path": inventory_path,
                    "sha": inventory_sha256,
                    "now": tx.ts(tx.now),
                    "opts": tx.json(dict(options)),
                },
            )
            assert found is not None
            run_id = int(found[0])
            count = await insert_jobs(tx, run_id, jobs())
            sizes = await assign_waves(tx, run_id, waves) if waves is not None else [count]
            reg = await register_in(
                tx, run_id, worker_id=runner_id, role="runner", lease_s=lease_s, exclusive=True
            )
            await events.append(
                tx,
                run_id=run_id,
                kind="run",
                to_status=RunStatus.CREATED.value,
                reason=f"created with {count} proxies",
                detail={"waves": sizes} if waves is not None else None,
            )
            row = await tx.fetchone(f"SELECT {RUN_COLS} FROM runs WHERE id = :id", {"id": run_id})
            assert row is not None
            return run_row(row), reg

        result: tuple[RunRow, Registration] = await self._submit(op)
        return result

    async def add_jobs(self, run_id: int, jobs: Iterable[NewJob], wave: int) -> int:
        """Jobs added to an existing run (an inventory that grew before a resume); duplicates ignored."""

        async def op(tx: Tx) -> int:
            existing = {
                (str(p), str(i), str(x))
                for p, i, x in await tx.fetch(
                    "SELECT project_id, instance_id, proxy_id FROM jobs WHERE run_id = :run", {"run": run_id}
                )
            }
            fresh = [j for j in jobs if (j.project_id, j.instance_id, j.proxy_id) not in existing]
            return await insert_jobs(tx, run_id, fresh, wave)

        result: int = await self._submit(op)
        return result

    async def set_run_status(self, run_id: int, status: RunStatus, reason: str | None = None) -> None:
        """Set the run's status and its ``stop_reason`` (cleared when ``reason`` is None). ``running``
        stamps ``started_at`` once and clears ``finished_at``; ``finished`` stamps ``finished_at``. A run
        event is appended when the status changes or a reason is given. Not guarded: any status may
        follow any other."""

        async def op(tx: Tx) -> None:
            values: dict[str, Any] = {
                "st": status.value,
                "reason": reason,
                "id": run_id,
                "now": tx.ts(tx.now),
            }
            extra = ""
            if status is RunStatus.RUNNING:
                extra = ", started_at = COALESCE(started_at, :now), finished_at = NULL"
            elif status is RunStatus.FINISHED:
                extra = ", finished_at = :now"
            old = await tx.fetchone("SELECT status FROM runs WHERE id = :id", {"id": run_id})
            await tx.execute(
                f"UPDATE runs SET status = :st, stop_reason = :reason{extra} WHERE id = :id", values
            )
            if old is not None and (old[0] != status.value or reason):
                await events.append(
                    tx, run_id=run_id, kind="run", from_status=old[0], to_status=status.value, reason=reason
                )

        await self._submit(op)

    async def set_run_options(self, run_id: int, options: Mapping[str, Any], changed: Sequence[str]) -> None:
        """New options for this and later resumes; the change is an operator action in the event log."""

        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE runs SET options = :o WHERE id = :id", {"o": tx.json(dict(options)), "id": run_id}
            )
            await events.append(tx, run_id=run_id, kind="options", reason="changed: " + ", ".join(changed))

        await self._submit(op)

    async def set_run_inventory(self, run_id: int, path: str, sha256: str) -> None:
        """Record the inventory file the run now follows (absolute ``path``, hex SHA-256 of its
        content), after a resume applied its changes. No event (the changes themselves are logged)."""

        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE runs SET inventory_path = :p, inventory_sha256 = :s WHERE id = :id",
                {"p": path, "s": sha256, "id": run_id},
            )

        await self._submit(op)

    async def open_wave(self, run_id: int, *, frm: int, to: int, reason: str) -> bool:
        """Open wave ``to`` if the run's open wave is still ``frm`` (several processes may try)."""

        async def op(tx: Tx) -> bool:
            n = await tx.execute(
                "UPDATE runs SET wave_open = :to WHERE id = :id AND wave_open = :frm",
                {"to": to, "id": run_id, "frm": frm},
            )
            if n:
                await events.append(tx, run_id=run_id, kind="wave", reason=reason, detail={"wave": to})
            return n == 1

        result: bool = await self._submit(op)
        return result

    async def ack_failures(self, run_id: int, reason: str) -> int:
        """An operator acknowledges the failures so far (``resume --ack``): they stop counting."""

        async def op(tx: Tx) -> int:
            row = await tx.fetchone(
                "SELECT count(*) FROM jobs WHERE run_id = :run AND counts_failure", {"run": run_id}
            )
            n = int(row[0]) if row else 0
            await tx.execute("UPDATE runs SET failures_acked = :n WHERE id = :id", {"n": n, "id": run_id})
            await events.append(tx, run_id=run_id, kind="ack", reason=reason, detail={"failures_acked": n})
            return n

        result: int = await self._submit(op)
        return result

    async def run_state(self, run_id: int, *, track: bool = True) -> RunState:
        """The run row and its counts in one transaction (see ``RunState``). Without ``track`` (--no-wait)
        an accepted job counts as finished for the waves and as nothing in flight."""

        async def op(tx: Tx) -> RunState:
            row = await tx.fetchone(f"SELECT {RUN_COLS} FROM runs WHERE id = :id", {"id": run_id})
            if row is None:
                raise LookupError(f"no run {run_id}")
            run = run_row(row)
            total = finished = failures = not_started = in_flight = open_unfinished = next_size = 0
            by_status: dict[str, int] = {}
            for status, wave_key, counts, n in await tx.fetch(
                "SELECT status, CASE WHEN wave <= :open THEN 0 WHEN wave = :next THEN 1 ELSE 2 END,"
                " counts_failure, count(*) FROM jobs WHERE run_id = :run GROUP BY 1, 2, 3",
                {"run": run_id, "open": run.wave_open, "next": run.wave_open + 1},
            ):
                st = JobStatus(status)
                n = int(n)
                total += n
                by_status[st.value] = by_status.get(st.value, 0) + n
                if wave_key == 1:
                    next_size += n
                done = st in TERMINAL or (st is JobStatus.ACCEPTED and not track)
                if done:
                    finished += n if st in TERMINAL else 0
                    if counts and st in TERMINAL:
                        failures += n
                    continue
                if wave_key == 0:
                    open_unfinished += n
                if st in (JobStatus.PENDING, JobStatus.RETRY_WAIT):
                    not_started += n
                else:
                    in_flight += n
            w = await tx.fetchone("SELECT max(wave) FROM jobs WHERE run_id = :run", {"run": run_id})
            waves = int(w[0]) if w and w[0] is not None else 1
            # when the open wave (not any earlier one) finished: --pause-between counts from there
            done_at = None
            if waves > 1:
                for at, detail in await tx.fetch(
                    "SELECT at, detail FROM events WHERE run_id = :run AND kind = 'wave-done'",
                    {"run": run_id},
                ):
                    if (from_json(detail) or {}).get("wave") == run.wave_open:
                        # two processes may both have marked it: the pause counts from the first mark
                        at_ = aware(at)
                        if at_ is not None and (done_at is None or at_ < done_at):
                            done_at = at_
            return RunState(
                run=run,
                total=total,
                finished=finished,
                failures=failures,
                not_started=not_started,
                in_flight=in_flight,
                open_unfinished=open_unfinished,
                waves=waves,
                last_wave_finished_at=done_at,
                db_now=tx.now,
                next_wave_size=next_size,
                by_status=by_status,
            )

        result: RunState = await self._submit(op)
        return result

    async def mark_wave_done(self, run_id: int, wave: int) -> None:
        """Record once that every job of ``wave`` (and those before it) finished: ``--pause-between``
        counts from here, in the database's clock, whichever process noticed first."""

        async def op(tx: Tx) -> None:
            seen = await tx.fetch(
                "SELECT detail FROM events WHERE run_id = :run AND kind = 'wave-done'", {"run": run_id}
            )
            for (detail,) in seen:
                if (from_json(detail) or {}).get("wave") == wave:
                    return
            await events.append(
                tx, run_id=run_id, kind="wave-done", reason=f"wave {wave} finished", detail={"wave": wave}
            )

        await self._submit(op)

    async def get_run(self, run_id: int) -> RunRow | None:
        """The run with this id, or None."""

        async def op(tx: Tx) -> RunRow | None:
            row = await tx.fetchone(f"SELECT {RUN_COLS} FROM runs WHERE id = :id", {"id": run_id})
            return run_row(row) if row else None

        result: RunRow | None = await self._submit(op)
        return result

    async def find_run(self, ref: str) -> RunRow | None:
        """A run by id, or the newest run of that name."""

        async def op(tx: Tx) -> RunRow | None:
            if ref.isdigit():
                row = await tx.fetchone(f"SELECT {RUN_COLS} FROM runs WHERE id = :id", {"id": int(ref)})
                if row:
                    return run_row(row)
            row = await tx.fetchone(
                f"SELECT {RUN_COLS} FROM runs WHERE name = :n ORDER BY id DESC LIMIT 1", {"n": ref}
            )
            return run_row(row) if row else None

        result: RunRow | None = await self._submit(op)
        return result

    async def latest_run(
        self, *, unfinished: bool = False, inventory_path: str | None = None
    ) -> RunRow | None:
        """The newest run (highest id), only among unfinished ones (any status but finished) when
        ``unfinished``, and of this inventory path when given; None when there is none."""

        async def op(tx: Tx) -> RunRow | None:
            where = ["1 = 1"]
            params: dict[str, Any] = {}
            if unfinished:
                where.append("status != 'finished'")
            if inventory_path is not None:
                where.append("inventory_path = :p")
                params["p"] = inventory_path
            row = await tx.fetchone(
                f"SELECT {RUN_COLS} FROM runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT 1", params
            )
            return run_row(row) if row else None

        result: RunRow | None = await self._submit(op)
        return result

    async def list_runs(
        self, *, limit: int = 20, since: datetime | None = None, statuses: Sequence[RunStatus] = ()
    ) -> list[RunRow]:
        """Runs, newest first, at most ``limit``: created at or after ``since`` (aware) and in one of
        ``statuses`` when given."""

        async def op(tx: Tx) -> list[RunRow]:
            where = ["1 = 1"]
            params: dict[str, Any] = {"lim": limit}
            if since is not None:
                where.append("created_at >= :since")
                params["since"] = tx.ts(since)
            if statuses:
                keys = []
                for i, st in enumerate(statuses):
                    params[f"s{i}"] = st.value
                    keys.append(f":s{i}")
                where.append(f"status IN ({', '.join(keys)})")
            rows = await tx.fetch(
                f"SELECT {RUN_COLS} FROM runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :lim", params
            )
            return [run_row(r) for r in rows]

        result: list[RunRow] = await self._submit(op)
        return result

    async def counts(self, run_id: int) -> dict[JobStatus, int]:
        """The run's job counts by status, every status present (0 when it has none)."""

        async def op(tx: Tx) -> dict[JobStatus, int]:
            out = {st: 0 for st in JobStatus}
            for st, n in await tx.fetch(
                "SELECT status, count(*) FROM jobs WHERE run_id = :run GROUP BY status", {"run": run_id}
            ):
                out[JobStatus(st)] = int(n)
            return out

        result: dict[JobStatus, int] = await self._submit(op)
        return result
