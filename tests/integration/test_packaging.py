"""Issue acceptance: the Alembic migrations ship inside the wheel and are found there; in the editable
install (this checkout) they are the repository's top-level ``migrations/``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parents[2]


def _run(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("wheel")
    p = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        cwd=out,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    wheels = list(out.glob("orchestrator-*.whl"))
    assert len(wheels) == 1, wheels
    yield wheels[0]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("target")
    p = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        cwd=target,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return target


def _env_with(target: Path) -> dict[str, str]:
    env = clean_env()
    env["PYTHONPATH"] = str(target)
    env.pop("PYTHONHOME", None)
    return env


def test_wheel_contains_the_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "orchestrator/migrations/env.py" in names, sorted(n for n in names if "migration" in n)
    assert "orchestrator/migrations/script.py.mako" in names
    versions = {p.name for p in (ROOT / "migrations" / "versions").glob("*.py")}
    assert versions, "the checkout has no migration scripts"
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("orchestrator/migrations/versions/")}
    assert versions <= shipped, f"missing from the wheel: {versions - shipped}"
    # the migrations live only under the package, not as a stray top-level package
    assert not any(n.startswith("migrations/") for n in names)
    # and the schema snapshot a new SQLite job table is made from (store/fresh.py)
    assert "orchestrator/store/schema_sqlite.sql" in names


def test_installed_wheel_finds_its_own_migrations(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _run(
        [
            sys.executable,
            "-c",
            "import orchestrator; from orchestrator.store.db import migrations_dir; "
            "print(orchestrator.__file__); print(migrations_dir())",
        ],
        cwd=elsewhere,
        env=_env_with(installed),
    )
    assert p.returncode == 0, p.stderr
    pkg_file, mig = p.stdout.strip().splitlines()
    assert Path(pkg_file).resolve().is_relative_to(installed.resolve()), pkg_file  # not the checkout
    mig_dir = Path(mig).resolve()
    assert mig_dir.is_relative_to(installed.resolve()), mig
    assert mig_dir == (installed / "orchestrator" / "migrations").resolve()
    assert (mig_dir / "env.py").is_file()
    assert not mig_dir.is_relative_to(ROOT)


def test_installed_wheel_migrates_a_job_table(installed: Path, tmp_path: Path) -> None:
    """The shipped env.py and scripts really run: `db upgrade` from the wheel, away from the checkout."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env_with(installed)
    db = elsewhere / "jobs.db"
    p = _run([sys.executable, "-m", "orchestrator", "db", "upgrade", "--db", str(db)], cwd=elsewhere, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    heads = {f.stem.split("_", 1)[0] for f in (ROOT / "migrations" / "versions").glob("*.py")}
    q = _run([sys.executable, "-m", "orchestrator", "db", "current", "--db", str(db)], cwd=elsewhere, env=env)
    assert q.returncode == 0, q.stdout + q.stderr
    assert q.stdout.strip() in heads, (q.stdout, heads)


def test_editable_install_uses_the_checkout_migrations(tmp_path: Path) -> None:
    from orchestrator.store.db import migrations_dir

    assert migrations_dir().resolve() == (ROOT / "migrations").resolve()
    # the same from a fresh interpreter started somewhere else (no PYTHONPATH: the editable install)
    env = clean_env()
    env.pop("PYTHONPATH", None)
    p = _run(
        [sys.executable, "-c", "from orchestrator.store.db import migrations_dir; print(migrations_dir())"],
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).resolve() == (ROOT / "migrations").resolve()
