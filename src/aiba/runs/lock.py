"""A lock on a run directory: one writer at a time.

The lock is an advisory ``fcntl.flock`` on ``{run}/.aiba.lock``, which also holds the
holder's pid, host, start time and command (for the message a second writer gets). The
operating system releases a flock when its process dies, so the lock of a killed run is
taken over by the next one without any clean-up.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import AibaError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".aiba.lock"


class RunLock:
    """``with RunLock(run_dir, what="aiba eval"):`` holds the run directory's lock.

    Raises :class:`AibaError` (kind ``locked``) naming the holder when another process
    holds it. ``name`` selects a separate lock (e.g. one per shard rank).
    """

    def __init__(self, run: str | Path, what: str = "aiba", name: str = LOCK_NAME):
        self.path = Path(run) / name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise AibaError(f"{self.path.parent} is in use by {holder}; wait for it to finish, or stop it "
                            "(a killed process releases the lock) or use another --out", kind="locked") from None
        except OSError:
            os.close(fd)  # the file system offers no locks (some network mounts): run unlocked
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.what,
                "argv": sys.argv[1:]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return (f"{info.get('command', 'another process')} (pid {info.get('pid')} on host {info.get('host')}, "
                    f"started {info.get('started')})")
        except (OSError, ValueError):
            return "another process"

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
