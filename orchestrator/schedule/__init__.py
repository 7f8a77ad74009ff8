"""Run-wide scheduling controls: maintenance windows, durations, canary waves, the failure breaker, and
the pure ``dispatch`` answer to "may a new upgrade start now?". Every module here is free of I/O and takes
the current time as an argument, so hours-long windows are tested in milliseconds."""
