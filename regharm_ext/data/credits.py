"""Photo credits as a Markdown table, generated from ``photos/CREDITS.tsv``.

    python -m regharm_ext.data.credits                   # print the table
    python -m regharm_ext.data.credits --update README.md  # rewrite it between the markers

The markers are ``<!-- credits:begin -->`` and ``<!-- credits:end -->``.
"""
from __future__ import annotations

import csv
import sys
from typing import Dict, List

from ..markdown_blocks import block_cli, cell, replace_block
from .photo_set import CREDITS, split_photos

BEGIN, END = "<!-- credits:begin -->", "<!-- credits:end -->"
COLUMNS = ("file", "width", "height", "licence", "author", "source")


def read_credits() -> List[Dict[str, str]]:
    """Rows of CREDITS.tsv (keys: file, width, height, licence, author, source)."""
    with open(CREDITS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{CREDITS} lacks columns {missing}")
    return rows


def markdown_table() -> str:
    """One row per photo: file, split (train/val), author, licence, linked source."""
    val = set(split_photos("val"))
    lines = ["| Photo | Split | Author | Licence | Source |", "|---|---|---|---|---|"]
    for r in read_credits():
        split = "val" if r["file"] in val else "train"
        src = r["source"].strip()
        host = src.split("/")[2] if src.count("/") >= 2 else src
        lines.append(f"| {cell(r['file'])} | {split} | {cell(r['author'])} | {cell(r['licence'])} | "
                     f"[{cell(host)}]({src}) |")
    return "\n".join(lines)


def update(text: str) -> str:
    """``text`` with the table between the markers replaced by the current one."""
    return replace_block(text, BEGIN, END, markdown_table())


def main(argv=None) -> int:
    return block_cli(argv, markdown_table, BEGIN, END, prog="python -m regharm_ext.data.credits", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
