"""A lean loopback GaussDB proxy API for benchmarks: a raw asyncio HTTP/1.1 server that costs little CPU.

Not the simulator (orchestrator/simulator): no faults, no auth checks, no per-call log file. It answers the
four routes the orchestrator uses, the way the API reference describes them (docs: api-contract.md):

- ``POST /v3/{project}/instances/{instance}/proxy/{proxy}/upgrade-version``: ACCEPT, one item with a
  workflow id unique across server restarts, after ``latency_ms``;
- ``GET .../proxy/{proxy}/taurusproxy/proxy-version``: ``current_version`` is the source version until
  the proxy's workflow completed, then the target version the upgrade call asked for;
- ``GET /v3/{project}/jobs?id=WF``: ``Running`` until ``job_delay_s`` after the ACCEPT, then
  ``Completed`` (400 ``DBS.200543`` for an unknown id, as a fresh job can be);
- ``GET /v3/{project}/immediate-jobs``: an empty list.

Every answer carries ``Date`` (the client measures its clock offset from it) and ``X-Request-Id``. Calls
are timed on arrival (wall clock, ``time.time()``, so a driver in another process can compare), counted
per route, and summarised by ``GET /_bench/stats``: counts, first/last upgrade call, calls/s between them,
and the busiest half-open 1-second window ``[t, t + 1)`` over all calls and over upgrade calls, computed
exactly from the arrival times; ``GET /_bench/count`` is the cheap progress view (calls, upgrade calls,
first call). ``POST /_bench/reset`` (JSON body: ``latency_ms``, ``job_delay_s``,
``source_version``) forgets every call and every proxy's state, so one server process serves a whole
benchmark run.

Run: ``python bench/lean_server.py [--port 0] [--ready-file F] [--latency-ms 0] [--job-delay-s 1.5]``.
The ready file receives ``http://127.0.0.1:PORT`` once listening. Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import time
import uuid
from array import array
from email.utils import formatdate
from pathlib import Path
from typing import Any

ROUTES = ("upgrade", "proxy-version", "jobs", "immediate-jobs", "other")
UPGRADE, VERSION, JOBS, IMMEDIATE, OTHER = range(5)
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


class State:
    """Everything the server remembers: settings, per-proxy upgrades, per-workflow accept times, calls."""

    def __init__(self, latency_ms: float, job_delay_s: float, source_version: str) -> None:
        self.prefix = uuid.uuid4().hex[:8]  # workflow ids stay unique across server restarts
        self.configure(latency_ms, job_delay_s, source_version)

    def configure(self, latency_ms: float, job_delay_s: float, source_version: str) -> None:
        self.latency_s = max(0.0, latency_ms / 1000.0)
        self.job_delay_s = max(0.0, job_delay_s)
        self.source_version = source_version
        self.seq = 0
        self.workflows: dict[str, tuple[float, str]] = {}  # workflow id -> (accepted at, proxy id)
        self.upgraded: dict[str, tuple[float, str]] = {}  # proxy id -> (completes at, target version)
        self.times = array("d")  # arrival time of every call (wall clock)
        self.routes = array("b")  # its route index
        self.requests = 0
        self.upgrades = 0
        self.cpu0 = _cpu()

    def record(self, route: int) -> float:
        now = time.time()
        self.times.append(now)
        self.routes.append(route)
        return now

    def stats(self) -> dict[str, Any]:
        counts = {name: 0 for name in ROUTES}
        for r in self.routes:
            counts[ROUTES[r]] += 1
        up = sorted(t for t, r in zip(self.times, self.routes, strict=True) if r == UPGRADE)
        every = sorted(self.times)
        out: dict[str, Any] = {
            "counts": counts,
            "calls": len(every),
            "upgrades": len(up),
            "first_call": every[0] if every else None,
            "last_call": every[-1] if every else None,
            "first_upgrade": up[0] if up else None,
            "last_upgrade": up[-1] if up else None,
            "upgrade_rate": (len(up) - 1) / (up[-1] - up[0]) if len(up) > 1 and up[-1] > up[0] else None,
            "busiest_1s_all": busiest(every, 1.0),
            "busiest_1s_upgrade": busiest(up, 1.0),
            "server_cpu_s": _cpu() - self.cpu0,  # since the last reset
            "latency_ms": self.latency_s * 1000.0,
            "job_delay_s": self.job_delay_s,
        }
        return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def busiest(times: list[float], period: float) -> int:
    """The most arrivals in any half-open window ``[t, t + period)``; ``times`` sorted ascending."""
    best = 0
    lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


class _DateCache:
    """The HTTP ``Date`` header, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


_DATE = _DateCache()


def _split_path(target: bytes) -> tuple[list[str], dict[str, str]]:
    path, _, query = target.decode("latin-1").partition("?")
    params: dict[str, str] = {}
    if query:
        for pair in query.split("&"):
            k, _, v = pair.partition("=")
            params[k] = v
    return path.strip("/").split("/"), params


def handle(state: State, method: bytes, target: bytes, body: bytes) -> tuple[int, bytes, bool]:
    """Answer one API call: ``(status, JSON body, counted)``. Control routes are not counted."""
    parts, params = _split_path(target)
    if parts and parts[0] == "_bench":
        return _control(state, parts, body)
    # /v3/{p}/instances/{i}/proxy/{x}/upgrade-version and .../taurusproxy/proxy-version
    if len(parts) >= 7 and parts[0] == "v3" and parts[2] == "instances" and parts[4] == "proxy":
        proxy = parts[5]
        if method == b"POST" and parts[6] == "upgrade-version":
            now = state.record(UPGRADE)
            state.upgrades += 1
            try:
                target_version = str(json.loads(body)["target_version"])
            except (ValueError, KeyError, TypeError):
                return 400, _error("DBS.200001", "parameter error"), True
            state.seq += 1
            wf = f"{state.prefix}-0000-4000-8000-{state.seq:012x}"
            state.workflows[wf] = (now, proxy)
            state.upgraded[proxy] = (now + state.job_delay_s, target_version)
            item = {"instance_id": parts[3], "workflow_id": wf, "state": "ACCEPT", "error_message": None}
            return 200, json.dumps({"update_result": [item]}).encode(), True
        if method == b"GET" and parts[6:] == ["taurusproxy", "proxy-version"]:
            now = state.record(VERSION)
            current = state.source_version
            done = state.upgraded.get(proxy)
            if done is not None and now >= done[0]:
                current = done[1]
            answer = {
                "current_version": current,
                "latest_version": "9.99.99.999",
                "can_upgrade": True,
                "risk": {},
            }
            return 200, json.dumps(answer).encode(), True
    if len(parts) == 3 and parts[0] == "v3" and method == b"GET":
        if parts[2] == "jobs":
            now = state.record(JOBS)
            wf = params.get("id", "")
            seen = state.workflows.get(wf)
            if seen is None:
                return 400, _error("DBS.200543", "job does not exist"), True
            ended = now >= seen[0] + state.job_delay_s
            job = {
                "id": wf,
                "name": "UpgradeProxyVersion",
                "status": "Completed" if ended else "Running",
                "created": _iso(seen[0]),
                "ended": _iso(seen[0] + state.job_delay_s) if ended else None,
                "process": "100%" if ended else "50%",
                "instance": {"id": ""},
                "fail_reason": None,
            }
            return 200, json.dumps({"job": job}).encode(), True
        if parts[2] == "immediate-jobs":
            state.record(IMMEDIATE)
            return 200, b'{"jobs": [], "total_count": 0}', True
    state.record(OTHER)
    return 404, _error("DBS.200002", "no such route"), True


def _control(state: State, parts: list[str], body: bytes) -> tuple[int, bytes, bool]:
    if parts[1:] == ["count"]:  # cheap, for a driver polling progress
        first = state.times[0] if state.times else None
        answer = {"calls": len(state.times), "upgrades": state.upgrades, "first_call": first}
        return 200, json.dumps(answer).encode(), False
    if parts[1:] == ["stats"]:
        return 200, json.dumps(state.stats()).encode(), False
    if parts[1:] == ["reset"]:
        cfg = json.loads(body) if body else {}
        state.configure(
            float(cfg.get("latency_ms", state.latency_s * 1000.0)),
            float(cfg.get("job_delay_s", state.job_delay_s)),
            str(cfg.get("source_version", state.source_version)),
        )
        return 200, b'{"ok": true}', False
    return 404, _error("BENCH.404", "no such control route"), False


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(t))


def _error(code: str, msg: str) -> bytes:
    return json.dumps({"error_code": code, "error_msg": msg}).encode()


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies (what aiohttp's client sends). Pipelined
    requests are answered in order: every answer waits the same latency, so timers fire in order."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            lines = head.split(b"\r\n")
            try:
                method, target, _version = lines[0].split(b" ", 2)
            except ValueError:
                self._close()
                return
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value.strip())
                elif lname == b"connection" and value.strip().lower() == b"close":
                    close = True
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            status, payload, _counted = handle(self.state, method, target, body)
            reply = self._reply(status, payload, close)
            if self.state.latency_s > 0 and not target.startswith(b"/_bench"):
                self.loop.call_later(self.state.latency_s, self._write, reply, close)
            else:
                self._write(reply, close)

    def _reply(self, status: int, payload: bytes, close: bool) -> bytes:
        self.state.requests += 1
        return b"".join(
            (
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
                b"Content-Type: application/json;charset=UTF-8\r\n",
                b"Content-Length: %d\r\n" % len(payload),
                b"Date: " + _DATE.get() + b"\r\n",
                b"X-Request-Id: %s-%d\r\n" % (self.state.prefix.encode(), self.state.requests),
                b"Connection: close\r\n\r\n" if close else b"\r\n",
                payload,
            )
        )

    def _write(self, reply: bytes, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(reply)
        if close:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(args: argparse.Namespace) -> None:
    state = State(args.latency_ms, args.job_delay_s, args.source_version)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(state), "127.0.0.1", args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(url, encoding="utf-8")
        os.replace(tmp, args.ready_file)  # the driver never reads a half-written file
    else:
        print(url, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", help="write the base URL here once listening")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay before every API answer")
    ap.add_argument("--job-delay-s", type=float, default=1.5, help="Running -> Completed after this")
    ap.add_argument("--source-version", default="2.23.12.000", help="every proxy's version until upgraded")
    asyncio.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
