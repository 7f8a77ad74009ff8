"""Group commit vs one commit per answer, on the real job table (SQLite, synchronous=FULL).

Run: python bench/store_bench.py [--jobs 2000] [--writers 64]
Reports rows/s for both and the ratio (group / single), measured in the same run: on a shared, noisy
machine only the ratio means something.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from orchestrator.states import JobStatus
from orchestrator.store import AttemptAnswer, Move, NewJob, new_worker_id, open_store


def fleet(n: int) -> list[NewJob]:
    return [
        NewJob(
            project_id="0" * 32,
            instance_id=f"{i:032x}in07",
            proxy_id=f"{i:032x}po01",
            endpoint="http://127.0.0.1:9",
            target_version="2.24.03.000",
            source_version="2.23.12.000",
        )
        for i in range(n)
    ]


async def one(url: str, n: int, writers: int, group: bool) -> float:
    store = await open_store(url)
    if not group:
        store.writer._max_batch = 1  # the same code path, one transaction per operation
    wid = new_worker_id()
    run, _reg = await store.create_run(
        name="bench",
        inventory_path="-",
        inventory_sha256="0" * 64,
        options={},
        jobs=lambda: fleet(n),
        runner_id=wid,
        lease_s=600,
    )
    jobs = []
    while len(jobs) < n:
        got = await store.claim(run.id, worker_id=wid, limit=500, lease_s=600, track=False)
        if not got.jobs:
            break
        jobs.extend(got.jobs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            job = jobs[queue.get_nowait()]
            intent = await store.record_intent(job, worker_id=wid, cloud_offset_s=None)
            assert intent is not None
            ok = await store.record_answer(
                job,
                intent.attempt_id,
                AttemptAnswer(outcome="accepted", http_status=200),
                workflows=(),
                move=Move(frm=JobStatus.IN_FLIGHT, to=JobStatus.ACCEPTED),
                worker_id=wid,
            )
            assert ok

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(writers)))
    elapsed = time.perf_counter() - t0
    await store.close()
    return 2 * len(jobs) / elapsed  # two durable writes per call: intent and answer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--writers", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        single = asyncio.run(one(f"sqlite:///{Path(d) / 'single.db'}", args.jobs, args.writers, False))
        group = asyncio.run(one(f"sqlite:///{Path(d) / 'group.db'}", args.jobs, args.writers, True))
    print(f"{args.jobs} jobs, {args.writers} concurrent workers, 2 durable writes per upgrade call")
    print(f"one commit per write : {single:9.0f} writes/s")
    print(f"group commit         : {group:9.0f} writes/s")
    print(f"ratio group/single   : {group / single:9.1f}x")


if __name__ == "__main__":
    main()
