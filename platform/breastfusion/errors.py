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


class Interrupted(UserError):
    """The user stopped the work (Ctrl-C: exit 130; SIGTERM: exit 143). Nothing unfinished
    was marked done; the message says how to continue."""

    def __init__(self, message: str, *, exit_code: int = 130, details: list[str] | None = None):
        super().__init__(message, details=details)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (see ``cli.main``), so that ``finally`` blocks and
    context managers clean up exactly as for Ctrl-C; the exit code is 143, not 130."""
