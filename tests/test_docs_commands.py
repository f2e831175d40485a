"""Commands the docs tell users to run name files that exist."""
from __future__ import annotations

import re
from pathlib import Path

import failure_modes

REPO = Path(__file__).resolve().parents[1]
UPDATE = re.compile(r"python tests/failure_modes\.py --update\s+((?:[\w./-]+\.md\s*)+)")


def _update_targets(text: str):
    """Files named after ``--update`` (a command may be wrapped over lines in Markdown)."""
    return [m.group(1).split() for m in UPDATE.finditer(text)]


def test_failure_modes_update_commands_name_existing_files():
    commands = _update_targets((REPO / "README.md").read_text(encoding="utf-8"))
    commands += _update_targets(failure_modes.__doc__)
    assert len(commands) >= 2
    for files in commands:
        assert len(set(files)) == len(files), f"a file named twice: {files}"
        for name in files:
            assert (REPO / name).is_file(), f"the docs say --update {name}, which does not exist"
