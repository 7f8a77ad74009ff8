"""Job table locations: the forms operators type (a file path, ``sqlite:///x``, ``postgresql://``) turned
into one canonical URL, and what each backend needs from it.

Plain string handling on purpose: ``run``, ``resume`` and ``worker`` must not import SQLAlchemy just to
read a URL (the import costs about 0.3 s of start-up, and SQLAlchemy is only needed for migrations).
Passwords never leave this module unmasked except in the DSN handed to the driver.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

from orchestrator.errors import UsageError

DEFAULT_DB = "sqlite+aiosqlite:///orchestrator.db"


class DatabaseUrlError(UsageError, ValueError):
    """A ``--db`` / ``ORCHESTRATOR_DB`` value that names no usable job table (one line, exit 2)."""


def _split(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise DatabaseUrlError("--db: not a database URL (expected sqlite:///FILE or postgresql://...)")
    return scheme.lower(), rest


def normalize_url(url: str | None) -> str:
    """The canonical URL (``sqlite+aiosqlite:///PATH`` or ``postgresql+asyncpg://...``) for what an
    operator typed, ``ORCHESTRATOR_DB``, or the default ``./orchestrator.db``. Raises ``DatabaseUrlError``."""
    if not url:
        url = os.environ.get("ORCHESTRATOR_DB") or DEFAULT_DB
    if "://" not in url:
        return f"sqlite+aiosqlite:///{url}"
    scheme, rest = _split(url)
    backend = scheme.split("+", 1)[0]
    if backend == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if backend in ("postgresql", "postgres"):
        if not rest or (rest.startswith("/") and len(rest) == 1):
            raise DatabaseUrlError("--db: a PostgreSQL URL needs a host or a database")
        return f"postgresql+asyncpg://{rest}"
    raise DatabaseUrlError(f"--db: unsupported database {backend!r} (use sqlite or postgresql)")


def backend_of(url: str | None) -> str:
    """``sqlite`` or ``postgresql``."""
    return _split(normalize_url(url))[0].split("+", 1)[0]


def sqlite_path(url: str | None) -> str | None:
    """The file of a SQLite job table (None for PostgreSQL or an in-memory database)."""
    full = normalize_url(url)
    scheme, rest = _split(full)
    if not scheme.startswith("sqlite"):
        return None
    path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel -> "rel"; sqlite:////abs -> "/abs"
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return unquote(path)


def asyncpg_dsn(url: str | None) -> str:
    """The libpq-style DSN asyncpg takes."""
    _scheme, rest = _split(normalize_url(url))
    return f"postgresql://{rest}"


def safe_url(url: str | None) -> str:
    """The URL with any password masked: the only form that may reach logs or errors."""
    try:
        full = normalize_url(url)
    except DatabaseUrlError:
        return "<unparseable database URL>"
    scheme, rest = _split(full)
    if scheme.startswith("sqlite"):
        return full
    parts = urlsplit(f"{scheme}://{rest}")
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    out = f"{scheme}://{netloc}{parts.path}"
    return out + (f"?{parts.query}" if parts.query else "")


def describe_url(url: str | None) -> str:
    """The job table for a person: ``sqlite:PATH`` or the URL with its password masked."""
    path = sqlite_path(url)
    if path is not None:
        return f"sqlite:{path}"
    return safe_url(url)


def host_port(url: str | None) -> str:
    """``host:port`` of a PostgreSQL URL (for "connection refused at ...")."""
    parts = urlsplit(asyncpg_dsn(url))
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_target(url: str | None, *, create: bool) -> None:
    """Say plainly what is wrong with a job table location before any driver does it cryptically.

    ``create``: the command may create the table (run, demo, db upgrade); read-only commands
    (status, report, history...) refuse a SQLite file that does not exist, naming it, instead of
    creating an empty one. Raises ``DatabaseUrlError`` (a UsageError: one line, exit 2)."""
    full = normalize_url(url)
    path = sqlite_path(full)
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise DatabaseUrlError(f"job table {path}: is a directory, not a SQLite database file")
    if p.exists():
        try:
            with p.open("rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise DatabaseUrlError(f"job table {path}: cannot read it: {exc.strerror}") from None
        if head and head != SQLITE_MAGIC:
            raise DatabaseUrlError(f"job table {path}: not a SQLite database")
        return
    if not create:
        raise DatabaseUrlError(f"no job table at {path} (nothing has run with it yet; check --db)")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise DatabaseUrlError(f"job table {path}: {parent} is not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise DatabaseUrlError(f"job table {path}: directory {parent} is not writable")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUrlError(
            f"job table {path}: cannot create directory {parent}: {exc.strerror}"
        ) from None
    try:
        # created owner-only: the job table holds the fleet's layout and the audit trail
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseUrlError(f"job table {path}: cannot create it: {exc.strerror}") from None


def explain_connect_error(url: str, exc: BaseException) -> str:
    """One line for an operator: what failed opening the job table (no password, no traceback)."""
    full = normalize_url(url)
    path = sqlite_path(full)
    if path is not None or backend_of(full) == "sqlite":
        return (
            f"cannot open the job table {path}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
    where = host_port(full)
    if isinstance(exc, ConnectionRefusedError | socket.gaierror) or "refused" in str(exc).lower():
        return f"cannot open the job table: connection refused at {where}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "://" in text:
        text = safe_url(text)
    return f"cannot open the job table at {where}: {type(exc).__name__}: {text}"
