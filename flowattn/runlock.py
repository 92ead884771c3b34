r"""A run directory belongs to one process: an advisory lock on ``<run>/lock``.

The lock is ``fcntl.flock`` on a file holding the owner's PID. The operating system
releases it when its process dies, however it dies, so a lock left by a killed run is
never in the way: the next run takes it over (and is told the dead PID). A second live
process asking for the same directory gets :class:`RunLockedError` naming the holder.
"""

from __future__ import annotations

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

import fcntl
import os
from pathlib import Path

from .errors import RunLockedError

LOCK_NAME = "lock"


class RunLock:
    """An exclusive advisory lock on a run directory (a context manager).

    Arguments:
        directory: The run directory (created if missing).

    Attributes:
        stale_pid: The PID recorded by a previous holder that died without releasing
            (None if there was none).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with RunLock(d):
        ...         try:
        ...             RunLock(d).acquire()
        ...         except RunLockedError as error:
        ...             print("refused")
        refused
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise RunLockedError(
                f"run directory {self.directory} is in use by {who}; wait for it to end "
                "or choose another --run-dir"
            ) from None
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            self.stale_pid = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
