"""Errors a user can act on.

Anything raised as a ``UserError`` is printed by the CLI as one clear message (no traceback)
and turned into a non-zero exit code. Messages name the file, row, patient or option at fault.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or configuration (exit code 2 by default)."""

    exit_code = 2

    def __init__(self, message: str, *, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details or [])

    def __str__(self) -> str:
        if not self.details:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {d}" for d in self.details)


class ManifestError(UserError):
    """The manifest is malformed or inconsistent; ``details`` lists every problem."""


class ImageError(UserError):
    """An image cannot be read or is unusable (names the file)."""


class SplitError(UserError):
    """Splits cannot be made, or a splits file does not match its manifest."""


class ConfigError(UserError):
    """A configuration value or file is invalid."""


class OutputError(UserError, OSError):
    """A file or folder cannot be written (names the path and the system's reason).

    Also an ``OSError``, so code that already catches ``OSError`` around a write still does.
    """
