"""User errors: one line, exit code 2, no traceback (the CLI catches them)."""


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it."""

    exit_code = 2
