"""File-system helpers shared by the atomic writers (checkpoints, caches, generated tasks)."""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file or directory made by ``tempfile.mkstemp`` / ``mkdtemp`` (0600 / 0700: private)
    the mode ``open`` and ``mkdir`` would give it (0666 / 0777 less the umask), so that caches,
    checkpoints and generated tasks are readable by the rest of a team."""
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod((0o777 if Path(path).is_dir() else 0o666) & ~umask)
