"""One conversion at a time per output path.

Two runs into the same ``OUT`` (a second terminal, a retry started while the first still runs, a
``--resume`` of a run that is not dead) would write the same ``OUT.partial``: the second could wipe
it with ``--overwrite`` while the first writes into it, or both could add units, and the rename at
the end would publish a checkpoint mixing the two. So a run holds an exclusive ``flock`` on a lock
file beside the output, ``.OUT.nvfp4-jax.lock`` in OUT's parent directory, from before it looks at
``OUT.partial`` until after ``OUT`` is final; a second run fails at once, naming the holder (its
pid and host, written into the file), and touches nothing.

The kernel drops the lock when its holder dies, whatever the death (SIGKILL included), so a lock
file left by a killed run does not block the next one: it is simply locked again. A finished run
removes its lock file. Between a holder's unlink and a newcomer's lock the newcomer may hold a
lock on a file that is no longer there; it checks that the path still names the file it locked
and starts over if not, so two runs never both think they hold the lock.

Where the filesystem refuses ``flock`` (some network or FUSE filesystems) the run goes on without
the lock and says so; in a multi-process run only process 0 takes it (the other processes write
into the ``OUT.partial`` process 0 laid out, under the same lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional

from nvfp4_jax.errors import NVFP4Error

LOCK_SUFFIX = ".nvfp4-jax.lock"


class OutputBusyError(NVFP4Error, RuntimeError):
    """Another run holds the output's lock."""


def lock_path(out) -> Path:
    out = Path(os.path.abspath(Path(out).expanduser()))
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _lock(path: Path, out) -> Optional[int]:
    """The fd holding the lock on ``path``; None where the filesystem has no flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputBusyError(
                f"{out} is being written by another nvfp4-jax run ({holder or 'holder unknown'}): wait for it "
                f"to finish or stop it, then run again (its lock: {path})") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: take the new one


@contextlib.contextmanager
def output_lock(out, log: Callable[[str], None] = lambda m: None) -> Iterator[Optional[Path]]:
    """Hold the lock of output ``out`` inside the block (see the module docstring); yields the lock
    file's path, or None where the filesystem has no flock. Raises :class:`OutputBusyError` if
    another run holds it. Creates OUT's parent directory if missing (the run would anyway)."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, out)
    if fd is None:
        log(f"note: {path.parent} does not support file locks; nothing stops a second run into {Path(out).name} "
            "meanwhile")
        yield None
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a newcomer then fails _same_file and retries
        os.close(fd)


__all__ = ["OutputBusyError", "lock_path", "output_lock", "LOCK_SUFFIX"]
