"""Region -> GaussDB(for MySQL) API host.

The hosts differ by region in three patterns that no template predicts, so this is a table copied from
the API reference (see ``docs/api-contract`` in shared docs); an explicit ``endpoint`` always wins.
"""

from __future__ import annotations

_PATTERNS: dict[str, tuple[str, ...]] = {
    "gaussdb.{region}.myhuaweicloud.com": (
        "cn-north-4", "cn-north-9", "cn-north-2", "cn-east-3", "cn-south-1", "cn-south-4",
        "cn-southwest-2", "ap-southeast-3", "ap-southeast-4", "sa-brazil-1", "ru-northwest-2",
    ),
    "gaussdbformysql.{region}.myhuaweicloud.com": (
        "tr-west-1", "ap-southeast-1", "ap-southeast-2", "cn-north-11", "me-east-1",
    ),
    "gaussdb-mysql.{region}.myhuaweicloud.com": ("af-south-1", "cn-east-5", "la-north-2", "cn-southwest-3"),
}  # fmt: skip

REGION_HOSTS: dict[str, str] = {
    region: pattern.format(region=region) for pattern, regions in _PATTERNS.items() for region in regions
}


class UnknownRegion(KeyError):
    pass


def endpoint_for_region(region: str) -> str:
    """The https base URL for ``region``; raises ``UnknownRegion`` for a region not in the table."""
    try:
        return f"https://{REGION_HOSTS[region]}"
    except KeyError:
        raise UnknownRegion(region) from None


def iam_endpoint_for_region(region: str) -> str:
    return f"https://iam.{region}.myhuaweicloud.com"
