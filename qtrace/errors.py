"""User-facing errors: one line saying what is wrong and what to do, never a traceback."""


class QtraceError(Exception):
    """A problem the user can fix. ``str()`` is the whole message, including the remedy."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}: {fix}" if fix else problem)
