"""Output paths checked before the work that fills them (harmonize, evaluate, train)."""
from __future__ import annotations

from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor (where a folder would be made)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether two output paths name one file (relative, ``..`` or a symlinked folder alike)."""
    return Path(a).resolve() == Path(b).resolve()
