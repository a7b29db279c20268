"""Atomic file writes: nothing of a user's results is ever left half-written.

A temporary is named ``.{stem}.{pid}.tmp{suffix}`` beside its target; the temporaries of a
writer that died (killed, power loss) are removed by :func:`remove_stale_temps`, which the
next run over the same folder calls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temps", "pid_alive"]

_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp(\.[^./]*)?$")


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: keep its files
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove :func:`atomic_write` temporaries in ``folder`` whose writer process is gone.

    Temporaries of live processes (another writer, this one) are kept. Returns the removed
    paths. Call it only while holding the folder's run lock, so no writer on another machine
    sharing the folder is in flight.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(".*.tmp*"):
        m = _TMP_RE.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
