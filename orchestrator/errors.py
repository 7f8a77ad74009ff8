"""Exit codes and the error types every command may raise for the operator to read."""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


class UsageError(Exception):
    """Bad input, usage, or a refused precondition: printed as one line, exit 2."""


class InputErrors(Exception):
    """Bad input with one or more problems, each printed as its own ``error:`` line, exit 2. Defined here
    (not beside the parser that raises it) so the command line can catch it without importing the parser
    and its validation library on every start."""

    @property
    def errors(self) -> Sequence[InputErrors]:
        return [self]
