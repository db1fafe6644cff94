"""Errors a user can fix, in one place.

Every class here derives from :class:`UserError`. The ``sslkit`` command prints a ``UserError``
as one line (``sslkit: error: ...``) and exits with status 2; any other exception is a bug and
shows its traceback. Raise one of these only when the message names the input at fault (a
config key, a file, a flag) and says how to fix it.

This module imports nothing heavy: the config loader and the command line use it before
torch is loaded.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in, or a fault of, the user's inputs; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config the user wrote cannot be used (a key, a value, a recipe name)."""


class UsageError(UserError, ValueError):
    """Command-line flags that cannot be used together or hold a bad value."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or a step that writes it) is not there."""


class ManifestError(UserError, ValueError):
    """A shard folder's manifest.json is unreadable, malformed, or does not match its shards."""


class RemoteError(UserError, OSError):
    """A remote shard or manifest cannot be read; ``status`` is the HTTP 4xx code when the server refused."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class RemoteNotFound(RemoteError, FileNotFoundError):
    """The server answered 404 or 410."""


class RunStopped(UserError, RuntimeError):
    """Training stopped on purpose: too much bad data, or too many non-finite steps in a row."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, permission denied); the previous ones are intact."""


__all__ = ["UserError", "ConfigError", "UsageError", "MissingInput", "ManifestError", "RemoteError",
           "RemoteNotFound", "RunStopped", "CheckpointWriteError"]
