"""Errors a user can cause, each carrying a message that says what is wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable


class ShoprankError(Exception):
    """Base of every error caused by input, configuration or state a user controls.

    The command line prints the message of these errors as one paragraph, without a traceback,
    and exits non-zero. Messages name the file or field at fault and the fix.
    """


class DataError(ShoprankError):
    """Input data cannot be read or does not have the expected shape."""


class MissingColumnsError(DataError):
    """A table lacks columns that a step requires."""

    def __init__(self, table: str, missing: Iterable[str], present: Iterable[str]) -> None:
        self.missing = sorted(missing)
        self.present = list(present)
        super().__init__(
            f"{table} is missing required column(s) {', '.join(self.missing)}; "
            f"found columns: {', '.join(self.present) or '(none)'}. "
            "Rename the columns in the source or give a column mapping."
        )


class ValidationFailedError(DataError):
    """A Great Expectations suite failed; ``report`` holds the readable report."""

    def __init__(self, report: str) -> None:
        self.report = report
        super().__init__(report)


class ConfigError(ShoprankError):
    """A configuration value or file is invalid."""


def require_columns(columns: Iterable[str], required: Iterable[str], table: str) -> None:
    """Raise :class:`MissingColumnsError` if any of ``required`` is not in ``columns``."""
    present = list(columns)
    missing = set(required) - set(present)
    if missing:
        raise MissingColumnsError(table, missing, present)
