"""Inventory files (YAML or CSV) -> a validated ``Inventory``, with one-line ``file:line: field: message``
errors. The format reference is ``docs/inventory.md``.

The whole file is validated before anything is returned, so a bad inventory can never leave half a fleet
queued; the entries are then streamed from the file again on each ``Inventory.entries()``, hash-checked,
so neither validation nor a run holds a 100,000-proxy fleet in memory.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from functools import partial
from typing import TypeVar

from orchestrator.cloud.endpoints import validate_endpoint
from orchestrator.inventory.csv_source import scan_csv
from orchestrator.inventory.errors import Problems
from orchestrator.inventory.fields import EntryBuilder, Val
from orchestrator.inventory.files import check_file, file_sha256
from orchestrator.inventory.model import Inventory, ProxyEntry, Summary
from orchestrator.inventory.yaml_source import scan_yaml

__all__ = ["load_inventory"]

_YAML_HINT = " (set it in the entry or in defaults)"
_CSV_HINT = " (empty cell)"
_CHANGED = "the file changed since it was validated; run the validation again"
_R = TypeVar("_R")


def load_inventory(path: str | os.PathLike[str], *, endpoint_override: str | None = None) -> Inventory:
    """Read and validate the whole inventory at ``path`` (``.yaml``/``.yml`` or ``.csv``).

    ``endpoint_override`` (``--endpoint``) is checked by ``validate_endpoint`` and then serves every entry.
    Raises ``InventoryErrors`` listing every problem found (up to ``MAX_LISTED``), sorted by line.
    Measured on the 2-core development machine: 100,000 entries in about 1.5 s (YAML) or 1 s (CSV),
    memory growing by about 25 MB (duplicate-detection digests and the summary's instance set).
    """
    path_str = os.fspath(path)
    errs = Problems(path_str)
    override = None
    if endpoint_override is not None:
        try:
            override = validate_endpoint(endpoint_override)
        except ValueError as exc:
            errs.fatal(None, "--endpoint", str(exc))
    suffix = os.path.splitext(path_str)[1].lower()
    if suffix not in (".yaml", ".yml", ".csv"):
        errs.fatal(
            None, None, f"unknown inventory format {suffix or '(no extension)'!r}; use .yaml, .yml or .csv"
        )
    if suffix == ".csv":
        return _load_csv(path_str, errs, override)
    return _load_yaml(path_str, errs, override)


def _drain(gen: Generator[ProxyEntry, None, _R], summary: Summary) -> _R:
    """Count every entry ``gen`` yields; its return value."""
    add = summary.add
    while True:
        try:
            entry = next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        add(entry)


def _load_yaml(path: str, errs: Problems, override: str | None) -> Inventory:
    digest = check_file(path, errs)
    summary = Summary()
    builder = EntryBuilder(errs, override, missing_hint=_YAML_HINT, dups=True)
    header, read = _drain(scan_yaml(path, errs, builder), summary)
    if header.defaults_after_proxies:  # the entries were read before their defaults: once more with them
        errs = Problems(path)
        summary = Summary()
        builder = EntryBuilder(errs, override, missing_hint=_YAML_HINT, dups=True)
        header, read = _drain(scan_yaml(path, errs, builder, preset_defaults=header.defaults), summary)
    if read != digest:
        errs.fatal(None, None, "the file changed while it was being read; validate it again")
    errs.raise_if_any()
    return Inventory(
        path,
        digest,
        "yaml",
        summary.count,
        header.policy,
        header.policy_line,
        window=header.window,
        window_line=header.window_line,
        notify=header.notify,
        notify_line=header.notify_line,
        policy_lines=header.policy_lines,
        summary=summary,
        reader=partial(_reread_yaml, defaults=header.defaults, override=override),
    )


def _load_csv(path: str, errs: Problems, override: str | None) -> Inventory:
    summary = Summary()
    builder = EntryBuilder(errs, override, missing_hint=_CSV_HINT, dups=True)
    digest = _drain(scan_csv(path, errs, builder), summary)
    errs.raise_if_any()
    if summary.count == 0:
        errs.fatal(None, None, "no proxies: the file has a header but no data rows")
    return Inventory(
        path,
        digest,
        "csv",
        summary.count,
        None,
        None,
        summary=summary,
        reader=partial(_reread_csv, override=override),
    )


def _unchanged(inv: Inventory, errs: Problems) -> None:
    try:
        digest = file_sha256(inv.path)
    except OSError as exc:
        errs.fatal(None, None, f"cannot read the file: {exc.strerror or exc}")
    if digest != inv.sha256:
        errs.fatal(None, None, _CHANGED)


def _reread_yaml(inv: Inventory, *, defaults: dict[str, Val], override: str | None) -> Iterator[ProxyEntry]:
    errs = Problems(inv.path, fail_fast=True)
    _unchanged(inv, errs)
    builder = EntryBuilder(errs, override, missing_hint=_YAML_HINT, dups=False)
    _, digest = yield from scan_yaml(inv.path, errs, builder, preset_defaults=defaults, entries_only=True)
    if digest != inv.sha256:
        errs.fatal(None, None, _CHANGED)


def _reread_csv(inv: Inventory, *, override: str | None) -> Iterator[ProxyEntry]:
    errs = Problems(inv.path, fail_fast=True)
    _unchanged(inv, errs)
    builder = EntryBuilder(errs, override, missing_hint=_CSV_HINT, dups=False)
    digest = yield from scan_csv(inv.path, errs, builder)
    if digest != inv.sha256:
        errs.fatal(None, None, _CHANGED)
