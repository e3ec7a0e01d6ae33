"""The writer lock: one process (one run) writes a store at a time.

The lock is the file ``.NAME.lock`` beside the store (so it outlives
``--overwrite`` and works for an HDF5 file too), held with ``flock`` for as
long as the store is open for writing. The kernel drops a ``flock`` when its
process dies, so a lock left by a killed run is taken over by the next
writer, which logs whose it was. The file records the holder's pid and host
for the message that refuses a second writer.

On a filesystem without ``flock`` (some network filesystems) the lock falls
back to the recorded pid: a holder on this host that no longer runs is stale
and taken over; a holder on another host is trusted, and the message says
which file to delete if that run is gone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from .errors import CacheLockedError

log = logging.getLogger(__name__)

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path(store_path: Path) -> Path:
    """Where the lock of ``store_path`` lives: ``.NAME.lock`` in the same folder."""
    store_path = Path(store_path)
    return store_path.with_name(f".{store_path.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw.decode("utf-8"))
        return holder if isinstance(holder, dict) else {"raw": raw[:200].decode("utf-8", "replace")}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"raw": raw[:200].decode("utf-8", "replace")}


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a process that left no details"
    if "pid" in holder:
        return f"pid {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
    return repr(holder.get("raw"))


class WriterLock:
    """An acquired writer lock for one store; :meth:`release` (or process exit) frees it."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = Path(store_path)
        self.path = lock_path(self.store_path)
        self._fd: Optional[int] = None
        self._pid = os.getpid()  # a forked child (a DataLoader worker) must not release its parent's lock
        self._acquire()

    def _refuse(self, holder: Optional[dict], extra: str = "") -> CacheLockedError:
        return CacheLockedError(
            f"{self.store_path} is being written by another process ({_describe(holder)}); two writers would "
            f"mix their images. Wait for that run to finish or stop it{extra} (lock file {self.path})")

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._flock(fd):
                    self._check_recorded_holder(fd)
                if not self._still_ours(fd):
                    os.close(fd)  # the previous holder removed the file as we locked it; lock the new one
                    continue
                previous = _read_holder(fd)
                if previous:
                    log.warning("%s: taking over the writer lock of %s, which no longer runs", self.store_path,
                                _describe(previous))
                self._record(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return

    def _flock(self, fd: int) -> bool:
        """Take the flock; False when the filesystem has none (then the recorded pid decides)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise self._refuse(_read_holder(fd)) from None
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                log.debug("%s: no flock on this filesystem (%s); using the recorded pid", self.path, exc)
                return False
            raise

    def _check_recorded_holder(self, fd: int) -> None:
        holder = _read_holder(fd)
        if not holder or "pid" not in holder:
            return
        if holder.get("host") != socket.gethostname():
            raise self._refuse(holder, "; if it is gone, delete the lock file")
        if _pid_alive(int(holder["pid"])) and int(holder["pid"]) != os.getpid():
            raise self._refuse(holder)

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _record(self, fd: int) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now}).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None or os.getpid() != self._pid:
            return
        try:
            if self._still_ours(self._fd):
                os.unlink(self.path)
        except OSError as exc:
            log.warning("could not remove the lock file %s: %s", self.path, exc)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:  # a store that is never closed still frees its lock
        try:
            self.release()
        except Exception:
            pass
