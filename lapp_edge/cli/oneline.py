"""Warnings a command wants the user to see, printed as one line each (`lapp-edge: warning: ...`)
instead of Python's two-line `file:line: Category: message` + source line."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def one_line_warnings(*categories: type[Warning]) -> Iterator[None]:
    """Inside the block, warnings of `categories` print as `lapp-edge: warning: <message>` on stderr
    (once per message); any other warning is shown as Python would."""
    original = warnings.showwarning
    shown: set[str] = set()

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not issubclass(category, categories):
            original(message, category, filename, lineno, file, line)
            return
        text = " ".join(str(message).split())
        if text not in shown:
            shown.add(text)
            print(f"lapp-edge: warning: {text}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
