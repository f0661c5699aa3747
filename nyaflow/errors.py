"""Errors that mean "the input is wrong", as opposed to a bug.

A stage raises `UserError` (or a subclass) with a message that names the bad input and says what to do;
the `nyaflow` command prints that message on one line and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing or wrong checkpoint, an empty prompt file, a prompt too long."""
