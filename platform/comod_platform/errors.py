"""The command line's user-facing error: one line, and an exit status."""
from __future__ import annotations

from contextlib import contextmanager

EXIT_USAGE = 2
EXIT_FAILED = 1


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


@contextmanager
def user_errors(*kinds: type[BaseException], code: int = EXIT_FAILED):
    """Raise errors of ``kinds`` as a :class:`UserError` with their message and exit status ``code`` (an
    error's own ``code``, where it has one)."""
    try:
        yield
    except kinds as err:
        raise UserError(str(err), getattr(err, "code", code)) from None
