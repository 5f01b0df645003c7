"""The lock that gives a local folder to one ``baton run`` at a time.

Two runs on one folder would share its EFS folder, but each would start its own moto
server and table. Both could then write the round files of one job id, and ``--fresh`` in
the second would delete the files of the job that the first is training. So ``baton run``
holds an exclusive ``flock`` on ``<local dir>/baton-run.lock`` for as long as its stack
runs, and a second run on the folder is rejected before it changes any file.

The kernel releases a ``flock`` when the last open descriptor of the locked file is
closed, which includes every exit of a process, a kill too. The stack's processes (moto's
server and the handler containers) inherit the descriptor, so after a killed
``baton run`` the folder stays locked until the last of them has exited, about half a
second later (see :func:`shared.local.processes.exit_when_orphaned`).

The file contains the holder's pid and, once its stack has started, the stack's endpoint
URL, as JSON, so that a rejected run can say where the folder's stack is.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE_NAME = "baton-run.lock"

# A reader may catch the holder between truncating the file and writing it again, so it
# reads again for this long before it reports the contents as unknown.
_READ_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class LockHolder:
    """The process that holds a local folder's lock, as its lock file records it.

    Attributes
    ----------
    pid : int or None
        The holder's process id; None when the file could not be read.
    endpoint_url : str or None
        The endpoint of the holder's stack; None until the stack has started.
    """

    pid: int | None
    endpoint_url: str | None

    def is_running(self) -> bool:
        """Return whether the holder's process still exists (True when its pid is unknown)."""
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            # The process exists but belongs to another user.
            return True
        return True


class LocalDirBusyError(RuntimeError):
    """Another process holds the lock of a local folder."""

    def __init__(self, local_dir: Path, holder: LockHolder):
        super().__init__(f"{local_dir} is locked by pid {holder.pid}")
        self.local_dir = local_dir
        self.holder = holder


class LocalDirLock:
    """An exclusive lock on a local folder, held from :meth:`acquire` until :meth:`release`.

    Use it as a context manager, which acquires on entry and releases on exit. While held,
    :attr:`fd` is the lock file's descriptor; a process started with it in ``pass_fds``
    shares the lock, which then lasts until that process has exited too.
    """

    def __init__(self, local_dir: str | os.PathLike):
        self.local_dir = Path(local_dir)
        self.path = self.local_dir / LOCK_FILE_NAME
        self.fd: int | None = None

    def acquire(self) -> "LocalDirLock":
        """Create the folder and the lock file if needed, lock the file and record this process in it.

        Raises
        ------
        LocalDirBusyError
            If another process holds the lock. The file is then left as it was.
        OSError
            If the folder or the file cannot be created or opened.
        """
        self.local_dir.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the file is rewritten only once this process holds the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LocalDirBusyError(self.local_dir, read_lock_holder(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.record(endpoint_url=None)
        return self

    def record(self, endpoint_url: str | None) -> None:
        """Write this process's pid and its stack's endpoint URL to the lock file."""
        if self.fd is None:
            raise RuntimeError(f"{self.path} is not locked by this process")
        payload = json.dumps({"pid": os.getpid(), "endpoint_url": endpoint_url}).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, payload, 0)

    def release(self) -> None:
        """Close this process's descriptor of the lock file; a second call does nothing.

        The lock itself ends once no process started with the descriptor is still running.
        The file stays, so that a later run locks the same file.
        """
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "LocalDirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def read_lock_holder(path: Path) -> LockHolder:
    """Return the holder recorded in the lock file at ``path``, with None for what cannot be read."""
    deadline = time.monotonic() + _READ_RETRY_SECONDS
    while True:
        try:
            contents = json.loads(path.read_bytes())
            pid, endpoint_url = contents["pid"], contents["endpoint_url"]
            if isinstance(pid, int) and (endpoint_url is None or isinstance(endpoint_url, str)):
                return LockHolder(pid, endpoint_url)
        except (OSError, ValueError, TypeError, KeyError):
            pass
        if time.monotonic() >= deadline:
            return LockHolder(None, None)
        time.sleep(0.05)
