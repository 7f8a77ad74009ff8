"""The simulator as an HTTP server: routes, the gateway pipeline (auth, throttle, faults), the call log.

Each API call walks the same pipeline as at the real gateway: latency, authentication, throttling, an
injected fault, then the fleet. Every call leaves one record in the call log (in memory and, when asked,
as flushed JSON lines in a file that survives the simulator being killed), which is what tests compare
with the orchestrator's job table: "the cloud saw N upgrade calls for this proxy and created these
workflows" is the ground truth the orchestrator's bookkeeping must agree with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiohttp import web
from pydantic import ValidationError

from orchestrator.simulator.auth import GatewayAuth
from orchestrator.simulator.faults import (
    AFTER,
    BEFORE,
    HANGS,
    MALFORMED,
    RESETS,
    Fault,
    FaultInjector,
    GatewayThrottle,
    fault_reply,
    malformed_reply,
    throttled_reply,
)
from orchestrator.simulator.fleet import BadRequest, Fleet, Reply, UpgradeAnswer, error_reply
from orchestrator.simulator.scenario import FaultName, FaultSpec, Scenario, load_bundled

JSON_TYPE = "application/json;charset=UTF-8"
_DROP_GRACE_S = 5.0  # after aborting the transport the handler is cancelled; this is only a backstop


class CallLog:
    """Every API call as a dict; optionally appended to a JSON-lines file, flushed per record."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self._file: IO[str] | None = None
        if path is not None:
            self._file = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def append(self, record: dict[str, Any]) -> None:
        """Keep ``record`` and, with a file, write it as one compact JSON line and flush."""
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file, if any (the records stay in memory); safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(slots=True)
class Handled:
    """A route's result: the reply (None when a scripted fault answers nothing) and fields to log."""

    reply: Reply | None
    log: dict[str, Any] = field(default_factory=dict)
    fault: FaultName | None = None


Route = Callable[[web.Request, bytes], Awaitable[Handled]]


class SimulatorServer:
    """The simulated cloud on a loopback port. ``async with SimulatorServer(scenario) as sim: sim.url``."""

    def __init__(
        self,
        scenario: Scenario,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] | None = None,
        shutdown_timeout: float = 0.5,
    ) -> None:
        self.host, self._requested_port = host, port
        self._clock_given = clock
        self.in_flight = 0
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._load(scenario, log_file)

    def _load(self, scenario: Scenario, log_file: str | os.PathLike[str] | None) -> None:
        """Everything a scenario decides, made anew: the fleet, faults, auth, throttle, latency, the call
        log and the counters (``__init__`` and ``reset``)."""
        self.scenario = scenario
        given = self._clock_given
        self.clock = given if given is not None else offset_clock(scenario.clock_offset_s)
        self.fleet = Fleet(scenario, clock=self.clock)
        self.faults = FaultInjector(scenario.faults, scenario.seed)
        self.gateway = GatewayAuth(scenario.auth, scenario.project_id, clock=self.clock)
        self.throttle = GatewayThrottle(scenario.faults.gateway_rate_limit)
        self.latency_s = scenario.latency_s
        self.call_log = CallLog(log_file)
        self.max_concurrent = 0
        self.calls: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self._seq = 0

    def reset(self, scenario: Scenario, log_file: str | os.PathLike[str] | None = None) -> None:
        """Serve ``scenario`` from now on as if just started on it (a new fleet, call log and counters),
        on the same port: a rehearsal or a test suite reuses one process instead of starting another.
        Raises ``ResetRefused`` while calls are in flight (their records would land in the new log)."""
        if self.in_flight:
            raise ResetRefused(f"{self.in_flight} calls in flight")
        self.call_log.close()
        self._load(scenario, log_file)

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to use as the endpoint, ``http://HOST:PORT`` (the bound port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def log(self) -> list[dict[str, Any]]:
        """Every API call so far as a record (keys in docs/simulator.md), oldest first."""
        return self.call_log.records

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: calls in total and by route, answers by HTTP status, the most calls served at once
        and those in flight now, tokens issued, auth failures, faults injected by kind, workflows made."""
        return {
            "total_calls": sum(self.calls.values()),
            "calls": dict(self.calls),
            "http_status": dict(self.statuses),
            "max_concurrent": self.max_concurrent,
            "in_flight": self.in_flight,
            "token_issues": self.gateway.token_issues,
            "auth_failures": self.gateway.auth_failures,
            "faults": dict(self.faults.injected),
            "workflows": len(self.fleet.workflows),
        }

    def build_app(self) -> web.Application:
        """The aiohttp application: the contract's routes behind the gateway pipeline (auth, throttle,
        faults, latency), ``POST /v3/auth/tokens`` (IAM), and the ``/_sim/`` routes (log, fleet, stats,
        patch, reset) for tests; any other path, through the same pipeline, a 404 ``APIGW.0101``."""
        app = web.Application(client_max_size=1 << 20)
        api: list[tuple[str, str, str, Route]] = [
            ("POST", "/v3/auth/tokens", "token", self._token),
            ("POST", "/v3/{project_id}/instances/{instance_id}/proxy/{proxy_id}/upgrade-version",
             "upgrade", self._upgrade),
            ("GET", "/v3/{project_id}/instances/{instance_id}/proxy/{proxy_id}/taurusproxy/proxy-version",
             "proxy_version", self._proxy_version),
            ("GET", "/v3/{project_id}/instances/{instance_id}/proxies", "proxies", self._proxies),
            ("GET", "/v3/{project_id}/instances", "instances", self._instances),
            ("GET", "/v3/{project_id}/jobs", "job", self._job),
            ("GET", "/v3/{project_id}/immediate-jobs", "immediate_jobs", self._immediate_jobs),
        ]  # fmt: skip
        for method, path, name, handler in api:
            app.router.add_route(method, path, self._api(name, handler))
        app.router.add_get("/_sim/log", self._sim_log)
        app.router.add_get("/_sim/fleet", self._sim_fleet)
        app.router.add_get("/_sim/stats", self._sim_stats)
        app.router.add_post("/_sim/patch", self._sim_patch)
        app.router.add_post("/_sim/reset", self._sim_reset)
        app.router.add_route("*", "/{tail:.*}", self._api("unknown", self._unknown))
        return app

    async def start(self) -> SimulatorServer:
        """Listen on ``host``:``port`` (0: a free port, then in ``port``); returns self. Raises
        ``OSError`` when the address cannot be bound."""
        # handler_cancellation: a client that gives up on a hung call must not leave a sleeping handler.
        runner = web.AppRunner(
            self.build_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def close(self) -> None:
        """Stop listening (handlers still running get ``shutdown_timeout`` seconds) and close the call
        log's file."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.call_log.close()

    async def __aenter__(self) -> SimulatorServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the gateway pipeline -----------------------------------------------------------------------

    def _api(self, route: str, handler: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve_call(request: web.Request) -> web.StreamResponse:
            self._seq += 1
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)
            self.calls[route] += 1
            info = request.match_info
            record: dict[str, Any] = {
                "seq": self._seq,
                "route": route,
                "method": request.method,
                "path": request.path,
                "project_id": info.get("project_id"),
                "instance_id": info.get("instance_id"),
                "proxy_id": info.get("proxy_id"),
                "workflow_id": request.query.get("id") if route == "job" else None,
                "received_at": time.time(),
                "answered_at": None,
                "http_status": None,
                "error_code": None,
                "fault": None,
                "effect": "none" if route == "upgrade" else None,
                "concurrent": self.in_flight,
                "request_id": uuid.uuid4().hex,
            }
            try:
                return await self._pipeline(request, route, handler, record)
            finally:
                self.in_flight -= 1

        return serve_call

    async def _pipeline(
        self, request: web.Request, route: str, handler: Route, record: dict[str, Any]
    ) -> web.StreamResponse:
        body = await request.read()
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if route not in ("token", "unknown"):
            denial = self.gateway.check(
                request.method, request.rel_url.raw_path, list(request.query.items()), request.headers, body
            )
            if denial is not None:
                record["auth"] = denial.reason
                return self._answer(request, record, denial.reply())
        if route != "unknown" and not self.throttle.allow(self.clock()):
            record["fault"] = "gateway_rate_limit"
            self.faults.injected["gateway_rate_limit"] = self.faults.injected.get("gateway_rate_limit", 0) + 1
            return self._answer(request, record, throttled_reply(self.faults.spec, self.throttle.limit))
        drawn = self.faults.draw(route) if route != "unknown" else None
        if drawn is not None:
            record["fault"] = drawn.kind
            if drawn.kind == "slow":
                await asyncio.sleep(self.faults.spec.slow_s)
            elif drawn.kind in BEFORE:
                return await self._fail(request, record, drawn, None)
        handled = await handler(request, body)
        record.update(handled.log)
        if handled.fault is not None:  # a scripted fault wins over a drawn one
            record["fault"] = handled.fault
            self.faults.injected[handled.fault] = self.faults.injected.get(handled.fault, 0) + 1
            scripted = Fault(handled.fault, 0)
            if handled.fault == "slow":
                await asyncio.sleep(self.faults.spec.slow_s)
            else:
                return await self._fail(request, record, scripted, handled.reply)
        elif drawn is not None and drawn.kind in AFTER:
            return await self._fail(request, record, drawn, handled.reply)
        assert handled.reply is not None  # only a scripted fault answers nothing
        return self._answer(request, record, handled.reply)

    async def _fail(
        self, request: web.Request, record: dict[str, Any], fault: Fault, reply: Reply | None
    ) -> web.StreamResponse:
        """Perform a fault; for the *_after kinds the fleet has already acted (``reply`` is its answer)."""
        if fault.kind in RESETS:
            self._record(record, "reset")
            return await self._drop(request)
        if fault.kind in HANGS:
            self._record(record, "hang")  # written now: the simulator may be killed during the hang
            await asyncio.sleep(self.faults.spec.hang_s)  # cancelled when the client disconnects
            return await self._drop(request)
        if fault.kind in MALFORMED:
            return self._answer(request, record, malformed_reply(fault))
        error = fault_reply(fault, self.faults.spec)
        if error is None:  # pragma: no cover - every kind is handled above
            raise AssertionError(fault.kind)
        return self._answer(request, record, error)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        await asyncio.sleep(_DROP_GRACE_S)  # connection_lost cancels this handler
        return web.Response(status=500)

    def _record(self, record: dict[str, Any], status: int | str, error_code: str | None = None) -> None:
        record["http_status"] = status
        record["error_code"] = error_code
        record["answered_at"] = time.time()
        self.statuses[str(status)] += 1
        self.call_log.append(record)

    def _answer(self, request: web.Request, record: dict[str, Any], reply: Reply) -> web.StreamResponse:
        self._record(record, reply.status, reply.error_code)
        # Date on the simulated cloud's clock (aiohttp would stamp the host's): clients measure the
        # cloud's clock offset from it, as they do against the real gateway.
        headers = {
            **reply.headers,
            "X-Request-Id": record["request_id"],
            "Date": formatdate(self.clock(), usegmt=True),
        }
        if reply.raw is not None:
            return web.Response(status=reply.status, body=reply.raw, headers=headers)
        headers.setdefault("Content-Type", JSON_TYPE)
        return web.Response(status=reply.status, text=json.dumps(reply.body), headers=headers)

    # -- API routes ---------------------------------------------------------------------------------

    async def _upgrade(self, request: web.Request, body: bytes) -> Handled:
        info = request.match_info
        parsed = _json_or_none(body)
        answer: UpgradeAnswer = self.fleet.upgrade(
            info["project_id"], info["instance_id"], info["proxy_id"], parsed
        )
        log: dict[str, Any] = {
            "effect": answer.effect,
            "workflows": list(answer.workflows),
            "items": list(answer.items),
            "workflow_id": answer.workflows[0] if answer.workflows else None,
            "script_step": answer.script_step,
        }
        if isinstance(parsed, dict):
            log["source_version"] = parsed.get("source_version")
            log["target_version"] = parsed.get("target_version")
        return Handled(answer.reply, log, answer.fault)

    async def _proxy_version(self, request: web.Request, body: bytes) -> Handled:
        info = request.match_info
        return Handled(self.fleet.proxy_version(info["project_id"], info["instance_id"], info["proxy_id"]))

    async def _proxies(self, request: web.Request, body: bytes) -> Handled:
        info = request.match_info
        return Handled(self.fleet.list_proxies(info["project_id"], info["instance_id"], request.query))

    async def _instances(self, request: web.Request, body: bytes) -> Handled:
        return Handled(self.fleet.list_instances(request.match_info["project_id"], request.query))

    async def _job(self, request: web.Request, body: bytes) -> Handled:
        return Handled(self.fleet.job(request.match_info["project_id"], request.query.get("id")))

    async def _immediate_jobs(self, request: web.Request, body: bytes) -> Handled:
        return Handled(self.fleet.immediate_jobs(request.match_info["project_id"], request.query))

    async def _token(self, request: web.Request, body: bytes) -> Handled:
        return Handled(self.gateway.issue_token(_json_or_none(body)))

    async def _unknown(self, request: web.Request, body: bytes) -> Handled:
        return Handled(
            error_reply(
                404, "APIGW.0101", "The API does not exist or has not been published in the environment."
            )
        )

    # -- simulator-only routes (no auth, not logged) ------------------------------------------------

    async def _sim_log(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.log)

    async def _sim_fleet(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.fleet.snapshot())

    async def _sim_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats)

    async def _sim_patch(self, request: web.Request) -> web.StreamResponse:
        data = _json_or_none(await request.read())
        try:
            result = self.apply_patch(data)
        except PatchError as exc:
            return web.json_response({"error_code": "SIM.400", "error_msg": str(exc)}, status=400)
        return web.json_response(result)

    async def _sim_reset(self, request: web.Request) -> web.StreamResponse:
        data = _json_or_none(await request.read())
        if not isinstance(data, dict) or not isinstance(data.get("scenario"), str):
            usage = 'the body must be {"scenario": PATH, "log_file": PATH}'
            return web.json_response({"error_code": "SIM.400", "error_msg": usage}, status=400)
        log_file = data.get("log_file")
        try:
            scenario = Scenario.load(data["scenario"])
            self.reset(scenario, log_file if isinstance(log_file, str) else None)
        except ResetRefused as exc:
            return web.json_response({"error_code": "SIM.409", "error_msg": str(exc)}, status=409)
        except Exception as exc:  # a scenario that does not load: said, the old one stays
            return web.json_response({"error_code": "SIM.400", "error_msg": str(exc)}, status=400)
        return web.json_response({"url": self.url, "proxies": len(self.fleet.snapshot())})

    def apply_patch(self, data: Any) -> dict[str, Any]:
        """Change the scenario at run time; raises PatchError (nothing partial for faults/latency)."""
        if not isinstance(data, dict):
            raise PatchError("the patch must be a JSON object")
        unknown = set(data) - {"proxies", "workflow", "workflows", "faults", "latency_s"}
        if unknown:
            raise PatchError(f"unknown patch keys {sorted(unknown)}")
        faults = self.faults.spec
        if "faults" in data:
            if not isinstance(data["faults"], dict):
                raise PatchError("faults must be a mapping")
            try:
                faults = FaultSpec.model_validate({**faults.model_dump(), **data["faults"]})
            except ValidationError as exc:
                first = exc.errors()[0]
                raise PatchError(f"faults.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        latency = data.get("latency_s", self.latency_s)
        if not isinstance(latency, int | float) or isinstance(latency, bool) or latency < 0:
            raise PatchError("latency_s must be a number >= 0")
        fleet_part = {k: data[k] for k in ("proxies", "workflow", "workflows") if k in data}
        try:
            result = self.fleet.patch(fleet_part)
        except BadRequest as exc:
            raise PatchError(str(exc.reply.body["error_msg"])) from None
        self.faults.replace(faults)
        self.throttle.limit = faults.gateway_rate_limit
        self.latency_s = float(latency)
        return {"faults": faults.model_dump(), "latency_s": self.latency_s, **result}


class PatchError(ValueError):
    """A ``/_sim/patch`` body that cannot be applied (answered 400 with the message)."""


class ResetRefused(RuntimeError):
    """``reset`` while calls are in flight (``/_sim/reset`` answers 409)."""


def offset_clock(offset_s: float) -> Callable[[], float]:
    """The simulated cloud's wall clock: the host's ``time.time()`` plus ``offset_s`` seconds."""
    if offset_s == 0:
        return time.time

    def now() -> float:
        return time.time() + offset_s

    return now


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None


async def serve(
    scenario: Scenario,
    host: str = "127.0.0.1",
    port: int = 0,
    log_file: str | os.PathLike[str] | None = None,
) -> SimulatorServer:
    """Start a simulator and return it (already listening); close it with ``await sim.close()``."""
    return await SimulatorServer(scenario, host=host, port=port, log_file=log_file).start()


def run_simulator(
    scenario_path: str | None,
    host: str,
    port: int,
    log_file: str | None,
    ready_file: str | None,
) -> None:
    """Blocking entry for ``orchestrator simulator``: serve until SIGINT/SIGTERM, then stop cleanly."""
    scenario = Scenario.load(scenario_path) if scenario_path else load_bundled()
    asyncio.run(_run_until_signalled(scenario, host, port, log_file, ready_file))


async def _run_until_signalled(
    scenario: Scenario, host: str, port: int, log_file: str | None, ready_file: str | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with SimulatorServer(scenario, host=host, port=port, log_file=log_file) as sim:
            if ready_file:  # before the line: whoever reads the line may look for the file at once
                _write_ready_file(ready_file, sim.url)
            print(f"simulator listening on {sim.url}", flush=True)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


def _write_ready_file(path: str, url: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(url + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a watcher never reads half a URL
