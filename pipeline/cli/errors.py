"""The one error type every command raises for its user."""


class CommandError(Exception):
    """A user-facing error: printed as `invmon: error: ...`, exit code 2, no traceback."""
