"""Inventory files (YAML or CSV): the proxies one run upgrades, validated whole before anything is queued.

Modules, one job each: ``model`` (ProxyEntry, Summary, Inventory), ``fields`` (the rules of one entry,
checked by pydantic), ``strict_yaml`` (YAML read strictly, in pieces, with lines), ``yaml_source`` and
``csv_source`` (the two layouts), ``files`` (hashing and the UTF-8 check), ``loader`` (``load_inventory``),
``summary`` (what ``validate`` prints), ``errors`` (one-line ``file:line: field: message`` errors).
The format reference is ``docs/inventory.md``.
"""

from orchestrator.cloud.endpoints import validate_endpoint as normalize_endpoint
from orchestrator.inventory.errors import MAX_LISTED, FileError, FileErrors, InventoryError, InventoryErrors
from orchestrator.inventory.files import file_sha256
from orchestrator.inventory.loader import load_inventory
from orchestrator.inventory.model import ENTRY_FIELDS, LANGUAGES, Inventory, ProxyEntry, Summary
from orchestrator.inventory.summary import summarize
from orchestrator.versions import version_key

__all__ = [
    "ENTRY_FIELDS",
    "LANGUAGES",
    "MAX_LISTED",
    "FileError",
    "FileErrors",
    "Inventory",
    "InventoryError",
    "InventoryErrors",
    "ProxyEntry",
    "Summary",
    "file_sha256",
    "load_inventory",
    "normalize_endpoint",
    "summarize",
    "version_key",
]
