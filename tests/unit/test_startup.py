"""orchestrator/startup.py: the collector is held while a command loads, then what it loaded is frozen and
the collector runs again; a program that calls the CLI in-process keeps its collector untouched. Each case
runs in a fresh interpreter: the collector's state is process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def _python(code: str) -> str:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_held_while_loading_then_frozen_and_running_again() -> None:
    out = _python(
        """
        import gc
        from orchestrator import startup
        startup.hold_collector()
        held = not gc.isenabled()
        import orchestrator.cli  # what a command loads
        startup.settle()
        print(held, gc.isenabled(), gc.get_freeze_count() > 1000, startup.froze())
        startup.settle()  # a second call changes nothing
        print(gc.isenabled(), startup.froze())
        """
    )
    assert out.splitlines() == ["True True True True", "True True"]


def test_an_in_process_caller_keeps_its_collector() -> None:
    out = _python(
        """
        import gc
        from orchestrator import startup
        startup.settle()  # never held: nothing to do
        print(gc.isenabled(), gc.get_freeze_count(), startup.froze())
        """
    )
    assert out == "True 0 False"


def test_the_command_line_settles_before_its_coroutine_runs() -> None:
    """``python -m orchestrator`` holds the collector from its first line; by the time a command's
    coroutine runs it is enabled again and the start-up objects are frozen."""
    out = _python(
        """
        import gc
        import orchestrator.cli as cli
        seen = {}

        async def probe():
            seen["enabled"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count()
            return 0

        import orchestrator.startup as startup
        startup.hold_collector()
        cli._run(probe)
        print(seen["enabled"], seen["frozen"] > 1000)
        """
    )
    assert out == "True True"
