"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback. Library code raises `UserError` for
bad input (unknown names, out-of-range values, missing files) so that Python
users get a clear message too.
"""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


def eps_range_error(what: str, eps: object) -> UserError:
    """The error for an eps outside [0, 1]; a value such as 8, on the 0-255 scale, gets 8/255 suggested."""
    text = f"{what} must lie in [0, 1] (pixel units, e.g. 8/255), got {eps:g}" if isinstance(eps, float) \
        else f"{what} must be a number in [0, 1] (pixel units, e.g. 8/255), got {eps!r}"
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and 1 < eps <= 255:
        text += f"; on the 0-255 scale, write {eps:g}/255 (= {eps / 255:.4g})"
    return UserError(text)
