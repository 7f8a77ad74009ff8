"""``python -m orchestrator`` and the ``orchestrator`` console script. SIGTERM means "stop, exit 3" from
the first moment: the handler is set before the command line's imports (about half a second), which would
otherwise end with 143."""

import signal

from orchestrator.startup import hold_collector

hold_collector()  # released by orchestrator.startup.settle once the command's modules are loaded


def _stop_during_imports(_signum: int, _frame: object) -> None:
    # nothing has been opened or written yet; the CLI sets its own handler once it runs
    raise SystemExit(3)


signal.signal(signal.SIGTERM, _stop_during_imports)

from orchestrator.cli import main  # noqa: E402 (after the handler: see the module docstring)


def entry() -> None:
    """The ``orchestrator`` console script: this module's import sets the SIGTERM handler first."""
    main()


if __name__ == "__main__":
    main()
