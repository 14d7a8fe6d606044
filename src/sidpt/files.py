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


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file beside it, then a rename, so
    a reader (or a run killed mid-write) sees the old file or the new one, never half of one. The
    one writer behind configs, results, caches, task files and tokenizers."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    umask_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
