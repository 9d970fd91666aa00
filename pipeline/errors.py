"""User-facing errors.

A :class:`UserError` is something the user can fix (a config key, a path, a data line).
Entry points print its message and exit with code 2, without a traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by user input: printed as one message, exit code 2."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """One or more problems with a stage config, reported together.

    Args:
        problems: ``(key, message)`` pairs; ``key`` is the dotted config key
            (``data.seq_len``) or ``""`` for the config as a whole.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"invalid config ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        for key, msg in self.problems:
            lines.append(f"  - {key}: {msg}" if key else f"  - {msg}")
        super().__init__("\n".join(lines))


class DiskFullError(UserError):
    """A write failed because the filesystem (or the user's quota) is full: exit code 2.

    Raised by :func:`pipeline.io.disk_full_error`; the message names the path being written,
    the free space left there, and what to do. Earlier published outputs are untouched
    (every output is written under a temporary name first).
    """
