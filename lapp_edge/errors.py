"""The one exception type that the CLI turns into a one-line error and exit code 2."""


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, no traceback."""


def one_line(message: str) -> str:
    """`message` with control characters (newlines included) shown escaped: an error is always one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)
