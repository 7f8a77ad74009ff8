"""The HTML window report: one self-contained page for a change board.

No network at all: inline CSS and inline SVG, no script, and a Content-Security-Policy that forbids every
fetch, so the file opens the same from a mail attachment or an air-gapped share. Every number a reader (or
a test) may check carries a stable ``id`` and ``data-value`` with the raw number (``count-succeeded``,
``calls-total``, ``latency-p50`` in seconds, ``wave-2-done``, ...); rows of lists carry ``data-*`` keys
(``data-workflow-id``, ``data-proxy-id``, ``data-rule``). Outside text is HTML-escaped. Times carry their
zone (UTC unless ``tz`` names another).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape
from typing import Any

from orchestrator.reporting.text import Zone, duration, human_time, human_time_zoned, zone, zone_label
from orchestrator.store.reports import STATUS_ORDER, WindowReport

COLORS = {
    "succeeded": "#2e7d32",
    "accepted": "#66bb6a",
    "skipped": "#90a4ae",
    "flagged": "#f9a825",
    "failed": "#c62828",
    "pending": "#cfd8dc",
    "retry_wait": "#8e24aa",
    "in_flight": "#1e88e5",
    "unknown": "#6d4c41",
}
#: options shown first, by name, when the run has them (later releases add window, waves, breaker)
LEADING_OPTIONS = ("rate", "concurrency", "window", "waves", "breaker", "wait", "preflight", "timeout")
BREAKER_NOTE = " <span class='muted'>(counts toward the failure breaker)</span>"
#: timeline buckets; a longer run is binned (each bar is then the busiest second of its bin)
MAX_BARS = 1200
#: nothing may be fetched: no script, no image, no font, no frame; only the inline style
CSP = "default-src 'none'; style-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;
 color:#1b1f23;background:#fff;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;white-space:nowrap}
.muted{color:#57606a} .hint{color:#0b5394} .bad{color:#c62828;font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
pre{margin:0;white-space:pre-wrap;font-size:12.5px} .kv th{width:160px} svg{display:block;margin:6px 0}
.group{margin:12px 0 18px}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _num(
    ident: str,
    value: float | int | None,
    text: str | None = None,
    *,
    cls: str = "num",
    tag: str = "td",
) -> str:
    """A number a test can read: ``id``, ``data-value`` (raw; empty when unknown) and the shown text."""
    raw = "" if value is None else (str(value) if isinstance(value, int) else f"{value:.6g}")
    shown = text if text is not None else ("" if value is None else str(value))
    return f'<{tag} id="{_e(ident)}" class="{cls}" data-value="{_e(raw)}">{_e(shown)}</{tag}>'


def _option_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, indent=1, sort_keys=True)
    return str(value)


def _option_row(key: str, value: Any) -> str:
    text = _e(_option_text(value))
    return f'<tr data-option="{_e(key)}"><th>{_e(key)}</th><td><pre>{text}</pre></td></tr>'


def _options(data: WindowReport) -> str:
    opts = dict(data.run.options)
    rows = []
    for key in LEADING_OPTIONS:
        if key in opts:
            rows.append((key, opts.pop(key)))
    rows.append(("wave open", data.run.wave_open))
    rows.append(("failures acknowledged", data.run.failures_acked))
    policy = opts.pop("policy", None)
    rest = sorted(opts.items())
    out = ['<table class="kv" id="options-table">']
    out.extend(_option_row(key, value) for key, value in rows)
    out.append("</table>")
    if rest or policy:
        out.append("<details><summary>all other options</summary><table class='kv'>")
        out.extend(_option_row(k, v) for k, v in rest + ([("policy", policy)] if policy else []))
        out.append("</table></details>")
    return "".join(out)


def _ordered(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    known = [(s, counts.get(s, 0)) for s in STATUS_ORDER]
    return known + sorted((s, n) for s, n in counts.items() if s not in STATUS_ORDER)


def _stacked_bar(counts: Mapping[str, int], ident: str, width: int = 600, height: int = 18) -> str:
    total = sum(counts.values())
    parts = [
        f'<svg id="{_e(ident)}" width="{width}" height="{height}" role="img" aria-label="jobs by status">'
    ]
    parts.append(f'<rect width="{width}" height="{height}" fill="#eef1f4"/>')
    x = 0.0
    for status, n in _ordered(counts):
        if not n or not total:
            continue
        w = width * n / total
        color = COLORS.get(status, "#999")
        parts.append(
            f'<rect x="{x:.2f}" width="{w:.2f}" height="{height}" fill="{color}">'
            f"<title>{_e(status)}: {n}</title></rect>"
        )
        x += w
    parts.append("</svg>")
    return "".join(parts)


def _counts(data: WindowReport) -> str:
    total = sum(data.counts.values())
    out = ["<table id='counts-table'><tr><th>state</th><th>jobs</th></tr>"]
    for status, n in _ordered(data.counts):
        if not n and status not in ("succeeded", "flagged", "failed"):
            continue
        swatch = f'<span class="swatch" style="background:{COLORS.get(status, "#999")}"></span>'
        out.append(
            f'<tr data-status="{_e(status)}"><td>{swatch}{_e(status)}</td>{_num(f"count-{status}", n)}</tr>'
        )
    out.append(f"<tr><th>total</th>{_num('count-total', total)}</tr></table>")
    out.append(_stacked_bar(data.counts, "counts-bar"))
    return "".join(out)


def _timeline(data: WindowReport, tz: Zone) -> str:
    series = data.calls_per_second
    peak = max((c for _, c in series), default=0)
    limit = data.rate_limit_per_s
    facts = (
        f"<p>{_num('calls-total', data.calls, tag='span', cls='')} upgrade calls; busiest second "
        f"{_num('calls-peak', peak, tag='span', cls='')}"
    )
    if limit is not None:
        facts += (
            f"; rate limit {_num('rate-limit', limit, f'{limit:g}', tag='span', cls='')}/s "
            f"(option <code>{_e(data.run.options.get('rate'))}</code>)"
        )
    facts += "</p>"
    if not series:
        return facts + "<p class='muted' id='timeline-empty'>No upgrade call was sent.</p>"
    first, last = series[0][0], series[-1][0]
    span = last - first + 1
    bin_s = max(1, math.ceil(span / MAX_BARS))
    buckets: dict[int, int] = {}
    for second, count in series:
        b = (second - first) // bin_s
        buckets[b] = max(buckets.get(b, 0), count)
    n_bins = (span + bin_s - 1) // bin_s
    w, h, left, bottom, top = 900, 220, 44, 28, 10
    plot_w, plot_h = w - left - 10, h - bottom - top
    y_max = max(peak, limit or 0, 1) * 1.1
    bar_w = plot_w / n_bins

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / y_max

    path = "".join(
        f"M{left + b * bar_w:.2f},{top + plot_h:.2f}V{y(c):.2f}h{max(bar_w, 0.6):.2f}V{top + plot_h:.2f}Z"
        for b, c in sorted(buckets.items())
    )
    parts = [
        f'<svg id="timeline" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="upgrade calls per second" data-bin-seconds="{bin_s}" data-first="{first}" '
        f'data-last="{last}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#f6f8fa"/>',
        f'<path d="{path}" fill="#1e88e5"/>',
    ]
    if limit is not None:
        parts.append(
            f'<line id="rate-limit-line" x1="{left}" x2="{left + plot_w}" '
            f'y1="{y(limit):.2f}" y2="{y(limit):.2f}" '
            f'stroke="#c62828" stroke-width="1.5" stroke-dasharray="6 4"/>'
            f'<text x="{left + plot_w - 4}" y="{y(limit) - 4:.2f}" text-anchor="end" font-size="11" '
            f'fill="#c62828">limit {limit:g}/s</text>'
        )
    for v in (0, y_max / 1.1 / 2, y_max / 1.1):
        parts.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.2f}" text-anchor="end" font-size="11" '
            f'fill="#57606a">{v:.3g}</text>'
        )
    start = human_time(datetime.fromtimestamp(first, UTC), tz)
    end = human_time(datetime.fromtimestamp(last, UTC), tz)
    parts.append(
        f'<text x="{left}" y="{h - 8}" font-size="11" fill="#57606a">{_e(start)}</text>'
        f'<text x="{left + plot_w}" y="{h - 8}" text-anchor="end" font-size="11" fill="#57606a">{_e(end)} '
        f"({_e(zone_label(tz))})</text></svg>"
    )
    note = (
        f"<p class='muted'>Each bar is {'one second' if bin_s == 1 else f'the busiest second of {bin_s} s'}, "
        "as the calls were sent (<code>attempts.sent_at</code>).</p>"
    )
    return facts + "".join(parts) + note


def _latency(data: WindowReport) -> str:
    lat = data.latency
    cells = [("p50", lat.p50), ("p90", lat.p90), ("p99", lat.p99), ("max", lat.max), ("mean", lat.mean)]
    head = "".join(f"<th>{name}</th>" for name, _ in cells)
    body = "".join(
        _num(f"latency-{name}", None if v is None else round(v, 3), "" if v is None else f"{v:.3f} s")
        for name, v in cells
    )
    return (
        f"<p>{_num('latency-count', lat.count, tag='span', cls='')} answered calls "
        "(answer time minus send time; nearest-rank percentiles).</p>"
        f"<table id='latency-table'><tr>{head}</tr><tr>{body}</tr></table>"
    )


def _waves(data: WindowReport) -> str:
    if not data.waves:
        return "<p class='muted'>No jobs.</p>"
    out = [
        "<table id='waves-table'><tr><th>wave</th><th>done</th><th>jobs</th><th>progress</th>"
        + "".join(f"<th>{_e(s)}</th>" for s in STATUS_ORDER)
        + "</tr>"
    ]
    for wv in data.waves:
        cells = "".join(_num(f"wave-{wv.wave}-{s}", wv.counts.get(s, 0)) for s in STATUS_ORDER)
        open_mark = "" if wv.wave <= data.run.wave_open else " <span class='muted'>(not open)</span>"
        out.append(
            f'<tr data-wave="{wv.wave}"><td>{wv.wave}{open_mark}</td>{_num(f"wave-{wv.wave}-done", wv.done)}'
            f"{_num(f'wave-{wv.wave}-total', wv.total)}"
            f"<td>{_stacked_bar(wv.counts, f'wave-{wv.wave}-bar', 240, 14)}</td>{cells}</tr>"
        )
    out.append("</table>")
    return "".join(out)


def _flagged(data: WindowReport, tz: Zone) -> str:
    total = sum(g.count for g in data.flagged)
    verb = "job needs" if total == 1 else "jobs need"
    out = [f"<p>{_num('flagged-total', total, tag='span', cls='')} {verb} an operator.</p>"]
    for g in data.flagged:
        rule = g.rule or "(no rule)"
        out.append(
            f'<div class="group" data-rule="{_e(rule)}" data-status="{_e(g.status)}" data-count="{g.count}">'
            f"<h3>{_e(g.count)} {_e(g.status)} by rule <code>{_e(rule)}</code>"
            f"{BREAKER_NOTE if g.counts_failure else ''}</h3>"
        )
        if g.hint:
            out.append(f"<p class='hint'>hint: {_e(g.hint)}</p>")
        out.append(
            f"<table><tr><th>proxy</th><th>instance</th><th>name</th><th>since ({_e(zone_label(tz))})</th>"
            "<th>reason</th></tr>"
        )
        for p in g.proxies:
            out.append(
                f'<tr data-proxy-id="{_e(p.proxy_id)}"><td class="id">{_e(p.proxy_id)}</td>'
                f'<td class="id">{_e(p.instance_id)}</td><td>{_e(p.name)}</td>'
                f"<td>{_e(human_time(p.updated_at, tz))}</td><td>{_e(p.reason)}</td></tr>"
            )
        out.append("</table></div>")
    return "".join(out)


def _events(data: WindowReport, tz: Zone) -> str:
    if not data.events:
        return "<p class='muted'>No operator or run events.</p>"
    out = [
        f"<table id='events-table'><tr><th>at ({_e(zone_label(tz))})</th><th>what</th><th>proxy</th>"
        "<th>from → to</th><th>who</th><th>reason</th></tr>"
    ]
    for ev in data.events:
        who = "@".join(x for x in (ev.os_user, ev.host) if x)
        out.append(
            f'<tr data-kind="{_e(ev.kind)}"><td>{_e(human_time(ev.at, tz))}</td><td>{_e(ev.kind)}</td>'
            f'<td class="id">{_e(ev.proxy_id)}</td><td>{_e(ev.from_status)} → {_e(ev.to_status)}</td>'
            f"<td>{_e(who)}</td><td>{_e(ev.reason)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _workflows(data: WindowReport, tz: Zone) -> str:
    out = [
        f"<p>{_num('workflows-total', len(data.workflows), tag='span', cls='')} workflow ids "
        "issued in this run.</p>"
        f"<table id='workflows-table'><tr><th>workflow id</th><th>proxy</th><th>state</th><th>status</th>"
        f"<th>source</th><th>created ({_e(zone_label(tz))})</th><th>ended</th></tr>"
    ]
    for w in data.workflows:
        out.append(
            f'<tr data-workflow-id="{_e(w.workflow_id)}"><td class="id">{_e(w.workflow_id)}</td>'
            f'<td class="id">{_e(w.proxy_id)}</td><td>{_e(w.state)}</td><td>{_e(w.status)}</td>'
            f"<td>{_e(w.source)}</td><td>{_e(human_time(w.created, tz))}</td>"
            f"<td>{_e(human_time(w.ended, tz))}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{_e(title)}</h2>{body}</section>'


def html_report(data: WindowReport, *, tz: Zone = None) -> str:
    """The window report of one run as a complete HTML document (UTF-8 text): run and options, jobs by
    state, upgrade calls per second against the rate limit, answer latency percentiles, progress by wave,
    what needs an operator (reasons and hints, grouped by rule), operator events, and every workflow id.
    Raises ValueError for an unknown ``tz``."""
    z = zone(tz)
    run = data.run
    label = zone_label(z)
    took = (
        duration((run.finished_at - run.started_at).total_seconds())
        if run.finished_at and run.started_at
        else ""
    )
    times = [
        ("created", run.created_at),
        ("started", run.started_at),
        ("finished", run.finished_at),
    ]
    facts = " · ".join(f"{name} {_e(human_time_zoned(v, z))}" for name, v in times if v is not None)
    head = (
        f"<header><h1>Run {_num('run-id', run.id, tag='span', cls='')}: {_e(run.name)}</h1>"
        f"<p>status <strong id='run-status' data-value='{_e(run.status)}'>{_e(run.status)}</strong> · {facts}"
        f"{f' · took {_e(took)}' if took else ''}</p>"
        f"<p class='muted'>inventory <code>{_e(run.inventory_path)}</code> · times in {_e(label)}</p>"
        + (f"<p class='bad' id='stop-reason'>last stop: {_e(run.stop_reason)}</p>" if run.stop_reason else "")
        + "</header>"
    )
    body = "".join(
        [
            head,
            _section("options", "Options and window", _options(data)),
            _section("counts", "Jobs by state", _counts(data)),
            _section("timeline", "Upgrade calls per second", _timeline(data, z)),
            _section("latency", "Answer latency", _latency(data)),
            _section("waves", "Progress by wave", _waves(data)),
            _section("flagged", "Needs an operator", _flagged(data, z)),
            _section("events", "Operator and run events", _events(data, z)),
            _section("workflows", "Every workflow id", _workflows(data, z)),
            f"<footer class='muted'><p>generated {_e(human_time_zoned(data.generated_at, z))} "
            "by orchestrator from the job table</p></footer>",
        ]
    )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Run {run.id} ({_e(run.name)}): window report</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
