"""Issue 15.3: the HTML window report, rendered in real headless Chromium (Debian's ``chromium``), loads
with no console error and no network request, shows the job table's numbers (read back from the DOM and
compared with the tables queried independently), and paints a page that is not blank.

Chromium is driven over the DevTools protocol with aiohttp's websocket client; its profile lives in a
fresh temporary folder and it listens on 127.0.0.1 only. Without a ``chromium`` binary the test is skipped
with a message (CI installs it: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from orchestrator.reporting import html_report
from orchestrator.store import db, reports
from tests import report_data as d

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",  # root in CI containers: the sandbox needs user namespaces we do not have
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,2000",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium here: apt-get install -y chromium (Debian's package; CI installs it)",
)


# ------------------------------------------------------------------------------------- DevTools driver
class Page:
    """One page target over the DevTools protocol: commands by id, events collected as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event_waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut and not fut.done():
                    fut.set_result(data)
            else:
                self.events.append(data)
                for name, fut in list(self._event_waiters):
                    if data.get("method") == name and not fut.done():
                        fut.set_result(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        answer = await asyncio.wait_for(fut, 60)
        assert "error" not in answer, (method, answer)
        return dict(answer.get("result", {}))

    def event(self, name: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._event_waiters.append((name, fut))
        return fut

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _start_chromium(profile: Path) -> subprocess.Popen[bytes]:
    assert CHROMIUM is not None
    with open(profile.parent / f"{profile.name}.log", "wb") as log:  # chromium's own messages, if needed
        return subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@contextlib.asynccontextmanager
async def chromium_page() -> AsyncIterator[Page]:
    profile = Path(tempfile.mkdtemp(prefix="orch-chromium-"))
    proc = _start_chromium(profile)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(600):
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            assert proc.poll() is None, "chromium exited at start"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split("\n")[0])
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [t for t in await r.json() if t.get("type") == "page"]
                if pages:
                    break
                await asyncio.sleep(0.05)
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                try:
                    yield page
                finally:
                    await page.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(profile.parent / f"{profile.name}.log")


# ------------------------------------------------------------------------------------- PNG colours
def png_colours(png: bytes, step: int = 2) -> tuple[int, float]:
    """(distinct colours, share of pixels that are not white) of an 8-bit RGB/RGBA non-interlaced PNG,
    sampling every ``step``-th pixel of every ``step``-th row (the rows are all unfiltered)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        chunk = png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, (depth, colour_type, interlace)
    bpp = 4 if colour_type == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    sampled = not_white = 0
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev, strict=True))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        if y % step:
            continue
        for x in range(0, stride, bpp * step):
            px = bytes(line[x : x + 3])
            colours.add(px)
            sampled += 1
            not_white += px != b"\xff\xff\xff"
    return len(colours), not_white / max(sampled, 1)


# ------------------------------------------------------------------------------------- what to expect
def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(math.ceil(q / 100 * len(s)), 1) - 1]


async def expected(conn: Any, run_id: int) -> dict[str, Any]:
    """The numbers the page must show, straight from the tables (plain SQL, not the report's queries)."""
    counts = dict(
        (
            await conn.execute(
                text(f"SELECT status, COUNT(*) FROM jobs WHERE run_id = {run_id} GROUP BY status")
            )
        ).all()
    )
    waves = (
        await conn.execute(
            text(f"SELECT wave, status, COUNT(*) FROM jobs WHERE run_id = {run_id} GROUP BY wave, status")
        )
    ).all()
    times = (
        await conn.execute(
            text(
                "SELECT a.sent_at, a.answered_at FROM attempts a JOIN jobs j ON j.id = a.job_id "
                f"WHERE j.run_id = {run_id}"
            )
        )
    ).all()
    wf = (
        await conn.execute(
            text(
                "SELECT w.workflow_id FROM workflows w JOIN jobs j ON j.id = w.job_id "
                f"WHERE j.run_id = {run_id} AND w.workflow_id IS NOT NULL ORDER BY w.id"
            )
        )
    ).all()
    flagged = (
        await conn.execute(
            text(
                f"SELECT proxy_id FROM jobs WHERE run_id = {run_id} "
                "AND status IN ('flagged', 'failed') ORDER BY id"
            )
        )
    ).all()

    def ts(v: Any) -> float:
        from datetime import UTC, datetime

        if isinstance(v, str):
            v = datetime.fromisoformat(v)
        return float((v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp())

    latencies = [ts(b) - ts(a) for a, b in times if b is not None]
    per_second: dict[int, int] = {}
    for a, _ in times:
        per_second[math.floor(ts(a))] = per_second.get(math.floor(ts(a)), 0) + 1
    want: dict[str, Any] = {f"count-{s}": str(n) for s, n in counts.items()}
    want["count-total"] = str(sum(counts.values()))
    want["calls-total"] = str(len(times))
    want["calls-peak"] = str(max(per_second.values()))
    want["latency-count"] = str(len(latencies))
    for q in (50, 90, 99):
        want[f"latency-p{q}"] = round(nearest_rank(latencies, q), 3)
    want["latency-max"] = round(max(latencies), 3)
    by_wave: dict[int, dict[str, int]] = {}
    for wave, status, n in waves:
        by_wave.setdefault(wave, {})[status] = n
    for wave, c in by_wave.items():
        want[f"wave-{wave}-total"] = str(sum(c.values()))
        want[f"wave-{wave}-done"] = str(
            sum(n for s, n in c.items() if s in ("succeeded", "skipped", "flagged", "failed"))
        )
        for s, n in c.items():
            want[f"wave-{wave}-{s}"] = str(n)
    want["flagged-total"] = str(len(flagged))
    return {"values": want, "workflows": [w for (w,) in wf], "flagged": [p for (p,) in flagged]}


READ_DOM = """JSON.stringify({
  values: Object.fromEntries(
    [...document.querySelectorAll('[id][data-value]')].map(e => [e.id, e.dataset.value])),
  workflows: [...document.querySelectorAll('#workflows-table tr[data-workflow-id]')]
    .map(e => e.dataset.workflowId),
  flagged: [...document.querySelectorAll('#flagged tr[data-proxy-id]')].map(e => e.dataset.proxyId),
  options: [...document.querySelectorAll('[data-option]')].map(e => e.dataset.option),
  hints: [...document.querySelectorAll('#flagged .hint')].map(e => e.textContent),
  title: document.title,
  header: document.querySelector('header').innerText,
  scripts: document.scripts.length,
})"""


# ------------------------------------------------------------------------------------- the test
async def _render(url: str, out: Path, tz: str) -> dict[str, Any]:
    engine = db.create_engine(db.normalize_url(url))
    try:
        await db.upgrade(engine)
        async with engine.begin() as conn:
            await d.populate(conn)
        async with engine.connect() as conn:
            want = await expected(conn, 1)
        async with d.Readable(db.normalize_url(url)).connect() as reader:
            data = await reports.window_report(reader, 1)
        out.write_text(html_report(data, tz=tz), encoding="utf-8")
        return want
    finally:
        await engine.dispose()


async def _look(page_file: Path) -> dict[str, Any]:
    async with chromium_page() as page:
        for domain in ("Runtime", "Log", "Page", "Network"):
            await page.send(f"{domain}.enable")
        loaded = page.event("Page.loadEventFired")
        await page.send("Page.navigate", url=page_file.as_uri())
        await asyncio.wait_for(loaded, 60)
        dom = json.loads(
            (await page.send("Runtime.evaluate", expression=READ_DOM, returnByValue=True))["result"]["value"]
        )
        shot = await page.send(
            "Page.captureScreenshot",
            format="png",
            clip={"x": 0, "y": 0, "width": 1100, "height": 1400, "scale": 0.5},
        )
        return {"dom": dom, "png": base64.b64decode(shot["data"]), "events": list(page.events)}


def test_window_report_in_headless_chromium(db_url: str, tmp_path: Path) -> None:
    page_file = tmp_path / "window.html"
    want = asyncio.run(_render(db_url, page_file, "Asia/Shanghai"))
    seen = asyncio.run(_look(page_file))
    events = seen["events"]

    errors = [
        e
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert not errors, errors
    requests = [
        e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests

    dom = seen["dom"]
    assert dom["scripts"] == 0
    got = dom["values"]
    for key, value in want["values"].items():
        if key.startswith("latency-p") or key == "latency-max":
            assert float(got[key]) == pytest.approx(value, abs=1e-3), key
        else:
            assert got[key] == value, (key, got.get(key), value)
    assert got["run-id"] == "1" and got["rate-limit"] == "2"
    assert dom["workflows"] == want["workflows"] == [d.W1, d.W3]
    assert dom["flagged"] == want["flagged"] == [d.P3]
    assert dom["hints"] == ["hint: " + d.HINT_5XX.replace("{run}", "1")]
    assert {"rate", "concurrency", "window", "waves", "breaker"} <= set(dom["options"])
    assert "Asia/Shanghai" in dom["header"] and "+08:00" in dom["header"]
    assert d.RUN1_NAME in dom["title"]

    colours, ink = png_colours(seen["png"])
    assert colours >= 8, colours  # text, rules, status colours, the timeline's bars
    assert 0.01 < ink < 0.9, ink


def test_hostile_names_stay_text(tmp_path: Path) -> None:
    """Markup in names and messages is escaped: the page has no element the data did not ask for."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"

    async def go() -> str:
        engine = db.create_engine(db.normalize_url(url))
        try:
            await db.upgrade(engine)
            async with engine.begin() as conn:
                await d.populate(conn)
                await conn.execute(
                    text("UPDATE runs SET name = '<img src=x onerror=alert(1)>' WHERE id = 2"),
                )
                await conn.execute(
                    text("UPDATE jobs SET reason = '</td><script>alert(1)</script>' WHERE id = 6")
                )
            async with d.Readable(db.normalize_url(url)).connect() as reader:
                return html_report(await reports.window_report(reader, 2))
        finally:
            await engine.dispose()

    page = asyncio.run(go())
    assert "<script" not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
