"""The baseline: a bare aiohttp loop sending the orchestrator's upgrade calls, with no records at all.

N tasks (64 by default) share one ``ClientSession`` (unlimited connector, as the orchestrator's client
has) and take proxies from a CSV inventory in order; each sends ``POST .../upgrade-version`` with the same
headers and JSON body the orchestrator sends, reads the answer and parses its JSON. Nothing is written
anywhere. This is the speed a tool with no job table could reach against the same server on the same
machine: the orchestrator's figure is reported as a ratio to it.

Run: ``python bench/bare_client.py INVENTORY.csv URL [--concurrency 64]``. Prints one JSON line with
``calls``, ``accepted``, ``elapsed_s`` (wall, first send to last answer) and ``calls_per_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time
from collections.abc import Iterator

import aiohttp


def proxies(path: str) -> Iterator[tuple[str, str, str, str, str]]:
    """``(project_id, instance_id, proxy_id, source_version, target_version)`` from a CSV inventory."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(line for line in fh if line.strip() and not line.startswith("#"))
        header = next(rows)
        col = {name: i for i, name in enumerate(header)}
        for row in rows:
            yield (
                row[col["project_id"]],
                row[col["instance_id"]],
                row[col["proxy_id"]],
                row[col["source_version"]],
                row[col["target_version"]],
            )


async def run(path: str, base: str, concurrency: int) -> dict[str, float]:
    todo = iter(list(proxies(path)))
    accepted = 0
    calls = 0
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Language": "en-us"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted, calls
        for project, instance, proxy, source, target in todo:
            url = f"{base}/v3/{project}/instances/{instance}/proxy/{proxy}/upgrade-version"
            body = json.dumps({"source_version": source, "target_version": target}).encode()
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                data = json.loads(await resp.read())
            calls += 1
            if resp.status == 200 and data["update_result"][0]["state"] == "ACCEPT":
                accepted += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "calls": calls,
        "accepted": accepted,
        "elapsed_s": elapsed,
        "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="bare aiohttp upgrade loop (benchmark baseline)")
    ap.add_argument("inventory", help="CSV inventory (bench/run.py writes one)")
    ap.add_argument("url", help="base URL of the loopback server")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.inventory, args.url.rstrip("/"), args.concurrency))))


if __name__ == "__main__":
    main()
