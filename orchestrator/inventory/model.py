"""What a validated inventory is: its entries (``ProxyEntry``), its scope counts (``Summary``) and the
``Inventory`` handle, which streams the entries from the file again on every iteration."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

__all__ = ["ENTRY_FIELDS", "LANGUAGES", "Inventory", "ProxyEntry", "Summary"]

ENTRY_FIELDS = ("project_id", "instance_id", "proxy_id", "region", "endpoint", "source_version",
                "target_version", "x_language", "name")  # fmt: skip
LANGUAGES = ("en-us", "zh-cn")


class ProxyEntry(NamedTuple):
    """One proxy to upgrade, with defaults applied and the endpoint already resolved (``endpoint`` is a
    normalised ``scheme://host[:port]``; None only when neither region, endpoint nor an override gave one,
    which validation refuses). ``line`` is the 1-based line of the entry (YAML) or record (CSV).

    Immutable; a named tuple rather than a frozen dataclass because a 100,000-proxy file makes 100,000 of
    them on every pass, and a tuple is built five times faster.
    """

    project_id: str
    instance_id: str
    proxy_id: str
    region: str | None
    endpoint: str | None
    source_version: str | None
    target_version: str
    x_language: str
    name: str | None
    line: int


@dataclass
class Summary:
    """The scope of an inventory, counted while it is validated: ``summarize`` prints it without reading
    the file again. Holds a number per instance and a count per distinct (project, region, endpoint,
    versions) group, not the entries."""

    count: int = 0
    _groups: Counter[tuple[str, str | None, str | None, str | None, str]] = field(default_factory=Counter)
    # hash() of each (project_id, instance_id): 64 bits are plenty for a count shown to a person, and an
    # int per instance keeps 100,000 instances to a few MB
    _instances: set[int] = field(default_factory=set, repr=False)

    def add(self, e: ProxyEntry) -> None:
        """Count one valid entry."""
        self.count += 1
        self._groups[(e.project_id, e.region, e.endpoint, e.source_version, e.target_version)] += 1
        self._instances.add(hash((e.project_id, e.instance_id)))

    @property
    def instances(self) -> int:
        """How many distinct (project_id, instance_id) pairs the entries name."""
        return len(self._instances)

    @property
    def projects(self) -> Counter[str]:
        """Entries per project_id."""
        out: Counter[str] = Counter()
        for (project, *_), n in self._groups.items():
            out[project] += n
        return out

    @property
    def targets(self) -> Counter[tuple[str, str]]:
        """Entries per (region or "-", endpoint or "-")."""
        out: Counter[tuple[str, str]] = Counter()
        for (_, region, endpoint, _, _), n in self._groups.items():
            out[(region or "-", endpoint or "-")] += n
        return out

    @property
    def versions(self) -> Counter[tuple[str, str]]:
        """Entries per (source_version or "(current)", target_version)."""
        out: Counter[tuple[str, str]] = Counter()
        for (_, _, _, source, target), n in self._groups.items():
            out[(source or "(current)", target)] += n
        return out


@dataclass(frozen=True)
class Inventory:
    """A validated inventory file.

    ``entries()`` reads the file again on every call and yields its ``ProxyEntry`` objects one at a time,
    so a 100,000-proxy fleet is never held in memory; the file's SHA-256 is checked before the first entry
    and after the last, and a file changed since validation raises ``InventoryErrors``.

    ``policy`` is the ``policy:`` mapping as plain Python values (YAML only; None when absent), with the
    line of its key and ``policy_lines`` (dotted path inside it -> line, for ``policy.loader``'s
    errors). ``window`` and ``notify`` are the raw strings of the top-level keys of those names (YAML
    only), with their lines. ``notify`` is left out of ``repr``: a webhook URL often carries a token.
    """

    path: str
    sha256: str  # hex SHA-256 of the file's bytes (file_sha256(path) gives the same without parsing)
    format: Literal["yaml", "csv"]
    count: int
    policy: dict[str, object] | None = field(hash=False)  # a dict: keep the frozen dataclass hashable
    policy_line: int | None
    window: str | None = field(default=None, kw_only=True)
    window_line: int | None = field(default=None, kw_only=True)
    notify: str | None = field(default=None, kw_only=True, repr=False)
    notify_line: int | None = field(default=None, kw_only=True)
    policy_lines: Mapping[str, int] = field(
        default_factory=dict, kw_only=True, repr=False, compare=False, hash=False
    )
    summary: Summary = field(default_factory=Summary, kw_only=True, repr=False, compare=False, hash=False)
    reader: Callable[[Inventory], Iterator[ProxyEntry]] | None = field(
        default=None, kw_only=True, repr=False, compare=False, hash=False
    )

    def entries(self) -> Iterator[ProxyEntry]:
        """The entries in file order, streamed from the file (see the class docstring); raises
        ``InventoryErrors`` if the file changed since it was validated or can no longer be read."""
        if self.reader is None:
            raise ValueError("this Inventory was not made by load_inventory: it has no reader")
        return self.reader(self)
