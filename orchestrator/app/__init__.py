"""The application layer: one coroutine per command, and the one composition root (``runtime``).

The CLI parses and calls these; they open the job table, build what a run needs with
``build_runtime`` (run, resume, worker, plan and demo alike), and say what happened. Nothing here parses
HTTP or writes SQL.
"""
