"""Photo credits as a Markdown table, generated from ``photos/CREDITS.tsv``.

    python -m regharm_ext.data.credits > credits.md
"""
from __future__ import annotations

import csv
import sys
from typing import Dict, List

from .photo_set import CREDITS, split_photos

COLUMNS = ("file", "width", "height", "licence", "author", "source")


def read_credits() -> List[Dict[str, str]]:
    """Rows of CREDITS.tsv (keys: file, width, height, licence, author, source)."""
    with open(CREDITS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{CREDITS} lacks columns {missing}")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").strip()


def markdown_table() -> str:
    """One row per photo: file, split (train/val), author, licence, linked source."""
    val = set(split_photos("val"))
    lines = ["| Photo | Split | Author | Licence | Source |", "|---|---|---|---|---|"]
    for r in read_credits():
        split = "val" if r["file"] in val else "train"
        src = r["source"].strip()
        host = src.split("/")[2] if src.count("/") >= 2 else src
        lines.append(f"| {_cell(r['file'])} | {split} | {_cell(r['author'])} | {_cell(r['licence'])} | "
                     f"[{_cell(host)}]({src}) |")
    return "\n".join(lines)


def main() -> int:
    print(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
