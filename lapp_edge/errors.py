"""The one exception type that the CLI turns into a one-line error and exit code 2."""


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, no traceback."""


def one_line(message: str) -> str:
    """`message` with control characters (newlines included) shown escaped: an error is always one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def os_error_text(error: OSError) -> str:
    """An OSError as one readable clause: "No space left on device: runs/a/checkpoint.pt"."""
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    reason = error.strerror or str(error)
    return f"{reason}: {' -> '.join(names)}" if names else reason
