"""User-facing errors.

Anything a user can fix (a bad CSV, a missing image, a wrong config key) raises InputError
with a message that names the file, and the row/column where there is one. The scripts'
entry point (cxrlt.core.cli.main_wrapper) prints it as one line and exits with status 2
instead of a traceback.
"""


class InputError(Exception):
    """Bad input the user can fix. The message names the file (and row/column)."""


class ConfigError(InputError):
    """Bad configuration: unknown key, wrong type, unknown model or loss name."""
