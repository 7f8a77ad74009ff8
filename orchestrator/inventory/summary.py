"""What ``orchestrator validate`` prints: the scope of an inventory, for a human to check before a run."""

from __future__ import annotations

from urllib.parse import urlsplit

from orchestrator.inventory.model import Inventory
from orchestrator.versions import try_version_key

__all__ = ["summarize"]


def summarize(inv: Inventory) -> str:
    """Several lines: file, format and hash, counts of proxies/instances/projects, proxies per project, per
    region/endpoint and per (source -> target) version pair, then the window, notify and policy keys. Uses
    the counts taken while validating; the file is not read again. The notify URL shows only its host."""
    s = inv.summary
    lines = [
        f"inventory: {inv.path}",
        f"format:    {inv.format}  sha256 {inv.sha256[:16]}",
        f"proxies:   {inv.count} on {s.instances} instance(s) in {len(s.projects)} project(s)",
        "projects:",
        *(f"  {p}  {n}" for p, n in sorted(s.projects.items())),
        "regions/endpoints:",
        *(f"  {r:<16} {ep}  {n}" for (r, ep), n in sorted(s.targets.items())),
        "versions (source -> target):",
        *(f"  {src} -> {tgt}  {n}" for (src, tgt), n in sorted(s.versions.items(), key=_version_pair_order)),
    ]
    if inv.window is not None:
        lines.append(f"window:    {inv.window}  (line {inv.window_line})")
    if inv.notify is not None:
        parts = urlsplit(inv.notify)
        lines.append(f"notify:    {parts.scheme}://{parts.hostname}/...  (line {inv.notify_line})")
    lines.append(
        f"policy:    {'line ' + str(inv.policy_line) if inv.policy is not None else 'none (defaults apply)'}"
    )
    return "\n".join(lines)


def _version_pair_order(
    item: tuple[tuple[str, str], int],
) -> tuple[tuple[int, ...], tuple[int, ...], str, str]:
    (source, target), _ = item
    return (try_version_key(source) or (), try_version_key(target) or (), source, target)
