"""One writer per run directory: a double-submitted job, or a requeue while the old job still runs, is refused.

``<run_dir>/.lock`` is created exclusively (O_EXCL, which shared file systems honour) and holds the holder's host,
pid and start time; a thread touches it every HEARTBEAT_S seconds. A lock is left behind by a dead process when its
holder is on this host and that pid is gone, or when its heartbeat is older than STALE_S (a holder on another node
that died with its node): such a lock is taken over, so a rerun is never blocked by a crash. A lock file that cannot
be read (left empty by a kill or a full disk between its creation and its first write, or holding anything but the
holder's record) is a dead holder's once it has not changed for STALE_S; younger, it may be being written.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from core import dist
from core.errors import UserError
from core.files import remove_stale_temporaries

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0  # seconds between touches of a held lock
STALE_S = 180.0  # a lock untouched this long belongs to a dead process (6 missed heartbeats)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


WRITING_S = 5.0  # an unreadable lock younger than this is probably being written: look again


def _read(path: Path) -> Optional[tuple[Optional[dict], float]]:
    """(holder info, or None when the file is not a holder's record; seconds since the last change), or None if the
    lock is gone."""
    try:
        text, age = path.read_bytes(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, age
    valid = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
    return (holder if valid else None), age


def _abandoned(holder: Optional[dict], age: float) -> bool:
    if holder is not None and holder["host"] == socket.gethostname():
        return not _pid_alive(holder["pid"])
    return age > STALE_S


class RunLock:
    """The lock on one run directory, held from :meth:`acquire` to :meth:`release` (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self.created: list[Path] = []

    def acquire(self) -> Optional[str]:
        """Take the lock; None when held, else why not (the holder)."""
        self.created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]  # removed if left empty
        for attempt in range(5):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                found = _read(self.path)
                if found is None:  # removed right now: look again
                    continue
                holder, age = found
                if holder is None and age < WRITING_S and attempt < 4:  # probably being written: look again
                    time.sleep(WRITING_S / 4)
                    continue
                if not _abandoned(holder, age):
                    return self._in_use(holder, age)
                if holder is None:
                    print(f"note: taking over the lock {self.path}: it cannot be read (empty or not a holder's "
                          f"record) and has not changed for {age:.0f} s", file=sys.stderr, flush=True)
                with contextlib.suppress(FileNotFoundError):  # a dead holder's lock: take it over
                    os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.abandoned-{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{LOCK_NAME}.abandoned-{os.getpid()}"))
                continue
            except OSError as err:  # read-only file system, permissions, disk full: found before any data loads
                return f"cannot write to run directory {str(self.run_dir)!r}: {err.strerror or err}"
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            threading.Thread(target=self._heartbeat, daemon=True).start()
            return None
        return f"could not take the lock {self.path} (it keeps changing); try again"

    def _in_use(self, holder: Optional[dict], age: float) -> str:
        if holder is None:
            return (f"the lock {self.path} cannot be read (empty or not a holder's record) and changed {age:.0f} s "
                    f"ago; it is taken over once it is {STALE_S:.0f} s old, or remove it if no job uses this run")
        return (f"run directory {str(self.run_dir)!r} is in use by pid {holder['pid']} on {holder['host']} "
                f"(since {holder.get('started')}, alive {age:.0f} s ago); wait for it, or remove {self.path} if that "
                "process is gone")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Drop the lock if it is still ours; directories it created that stayed empty (nothing was written) go too."""
        self._stop.set()
        found = _read(self.path)
        if found is not None and found[0] == self.me:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for directory in self.created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds when empty


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """The run directory's lock for the duration of the block; under torchrun rank 0 holds it for all ranks, and
    every rank stops with the same error when it is taken."""
    lock = RunLock(run_dir)
    problem = lock.acquire() if dist.is_main() else None
    problem = dist.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    if dist.is_main():  # the lock is ours: a temporary file in the run directory is a killed writer's leftover
        remove_stale_temporaries(run_dir)
    try:
        yield
    finally:
        if dist.is_main():
            lock.release()
