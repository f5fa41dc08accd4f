"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback. Library code raises `UserError` for
bad input (unknown names, out-of-range values, missing files) so that Python
users get a clear message too.
"""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""
