"""Files that readers see whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, content: str | bytes) -> None:
    """``content`` into ``path`` whole or not at all: written beside it (a name of its own per
    process), then renamed over it; what a failed write leaves is removed."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        if isinstance(content, str):
            partial.write_text(content, encoding="utf-8")
        else:
            partial.write_bytes(content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
