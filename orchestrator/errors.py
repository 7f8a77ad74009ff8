"""Exit codes and the error types every command may raise for the operator to read."""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STOPPED, EXIT_HALTED = 0, 1, 2, 3, 4
"""0 every proxy done without problems; 1 finished with flagged or failed proxies; 2 bad input, usage,
credentials, or refused (held by another live process); 3 stopped before finishing (a signal, a lost
database, the maintenance window closed): ``resume`` continues; 4 halted: the failure breaker tripped, a
person must decide (``resume --ack`` or ``--max-failures``)."""


class DatabaseUnavailable(Exception):
    """The job table stayed unusable longer than the outage budget (``--db-outage-timeout``): the run
    stops cleanly, exit 3. Defined here so the command line maps it without importing the store."""


class UsageError(Exception):
    """Bad input, usage, or a refused precondition: printed as one line, exit 2."""


class InputErrors(Exception):
    """Bad input with one or more problems, each printed as its own ``error:`` line, exit 2. Defined here
    (not beside the parser that raises it) so the command line can catch it without importing the parser
    and its validation library on every start."""

    @property
    def errors(self) -> Sequence[InputErrors]:
        """The problems to print, one ``error:`` line each: here just this one; subclasses that gather
        several (the inventory's) return them all."""
        return [self]
