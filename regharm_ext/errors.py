"""One-line error messages for the command-line tools (no tracebacks for the user's mistakes)."""
from __future__ import annotations

import contextlib
import sys
import warnings


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line.

    An exception raised in a DataLoader worker is re-raised in the main process with the worker's
    traceback inside its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ... DataError: <message>"): the original message, its last line, is kept."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix, sep, rest = last.partition(": ")
        text = rest if sep and prefix.rsplit(".", 1)[-1] == type(exc).__name__ else last
    if isinstance(exc, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({lines[0]})" if lines else "")
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ..."


@contextlib.contextmanager
def warnings_as_notes():
    """Warnings raised inside, printed after it as one ``note: ...`` line each on stderr (the
    command-line tools' style) rather than Python's two lines with a source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
