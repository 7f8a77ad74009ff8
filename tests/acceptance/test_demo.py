"""The README's demo command, as a newcomer runs it (smaller fleet: the same code path, a fraction of the
time). It must end with the summary, the audit queries and the scenario check, and exit 0."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cli


def test_demo_ends_as_the_scenario_predicts(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    r = cli("demo", "--proxies", "40", "--db", str(db), cwd=tmp_path, timeout=600)
    assert r.code == 0, str(r)
    assert "the run ended as the scenario predicts" in r.out
    assert "audit query" in r.out
    assert "succeeded" in r.out
    assert db.exists()
