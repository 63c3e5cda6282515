"""Paths read from data (a LLaVA record's image, a multiple-choice question's image) stay inside their folder.

A name is judged twice: by its text before anything is opened (an absolute path or a ``..`` part would let a record
read any file of the machine), and by the file it resolves to when it is opened (a symlink inside the folder may
point anywhere).
"""

from __future__ import annotations

import re
from pathlib import Path


def outside_folder(name: str) -> str | None:
    """Why the relative ``name`` would leave its folder ("an absolute path" or "a '..' part"), or None."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a '..' part"
    return None


def escapes_folder(folder: Path, name: str) -> str | None:
    """Why ``folder / name`` opens a file outside ``folder`` (its text, or a link resolving elsewhere), or None."""
    if reason := outside_folder(name):
        return reason
    target = (Path(folder) / name).resolve()
    if not target.is_relative_to(Path(folder).resolve()):
        return f"a link to {target}"
    return None
