"""The errors every command raises for its user: printed as `invmon: error: ...`, no traceback.

The exit status tells a script which kind it was: 2 when the command line itself is wrong (as
argparse's own errors), 1 when the command ran and failed.
"""


class CommandError(Exception):
    """The command ran and failed: a failed run, a refused deploy, an AWS or registry error, a
    run, version or file that is not there."""

    exit_code = 1


class UsageError(CommandError):
    """The command line is wrong: an option value or a combination of options no command could
    act on, found before anything was changed."""

    exit_code = 2
