"""Exit codes and the one error type every command may raise for the operator to read."""

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


class UsageError(Exception):
    """Bad input, usage, or a refused precondition: printed as one line, exit 2."""
