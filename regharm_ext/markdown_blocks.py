"""Generated blocks of Markdown files (the README's credits, failure-mode and benchmark tables):
the text between an HTML-comment begin/end marker pair belongs to a generator, so a table is
never typed by hand and a test can check that the file holds the current one."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional


def cell(text: str) -> str:
    """``text`` safe inside one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def replace_block(text: str, begin: str, end: str, body: str, append: bool = False) -> str:
    """``text`` with ``body`` between the markers ``begin`` and ``end``.

    Without the markers: ValueError naming them, or, with ``append``, the block added at the end.
    """
    body = body if body.endswith("\n") else body + "\n"
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        if not append:
            raise ValueError(f"no {begin} ... {end} block found")
        return text.rstrip("\n") + f"\n\n{begin}\n{body}{end}\n"
    return f"{text[:start]}{begin}\n{body}{text[stop:]}"


def rewrite_files(paths: Iterable[Path], update: Callable[[str], str]) -> int:
    """Rewrites each file with ``update(text)`` where that changes it; 2 on the first error
    (printed with the file's name), else 0."""
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
            new = update(text)
            if new != text:
                path.write_text(new, encoding="utf-8")
                print(f"updated {path}")
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
    return 0


def block_cli(argv: Optional[List[str]], render: Callable[[], str], begin: str, end: str,
              prog: Optional[str] = None, description: str = "") -> int:
    """The command line of a generator: print the block, or ``--update FILE...`` rewrites the
    block between ``begin`` and ``end`` in each file."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--update", type=Path, nargs="*", default=None, help="Markdown files to rewrite in place")
    a = p.parse_args(argv)
    if a.update is None:
        print(render())
        return 0
    return rewrite_files(a.update, lambda text: replace_block(text, begin, end, render()))
