"""Atomic file writes: nothing of a user's results is ever left half-written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, then ``os.replace``.

    ``data`` is bytes, text, or a writer called with the temporary path (the temporary keeps
    ``path``'s suffix, so writers that pick the format from it, such as ``np.savez`` or
    ``savefig``, work). The file is fsynced before the rename. On failure ``path`` is left as
    it was and the temporary is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
