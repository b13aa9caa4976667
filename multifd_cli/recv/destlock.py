"""One recv per DEST: the lock, and the removal of what a killed recv left."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import uuid

from multifd_cli.errors import UsageError
from multifd_cli.recv.naming import remove_path

log = logging.getLogger("multifd")


class DestLock:
    """An flock on a per-DEST lock file, held from before listening to the end.

    The lock file lives in a runtime directory, keyed by DEST's real path, and
    is never removed: removing lock files races with their next user.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = os.path.dirname(path)
        self.name = os.path.basename(path)
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or refuse; then clear the strays only a holder may touch."""
        lock_dir = os.path.join(tempfile.gettempdir(), f"multifd-locks-{os.getuid()}")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        key = hashlib.sha256(os.fsencode(os.path.realpath(self.path))).hexdigest()[:32]
        fd = os.open(os.path.join(lock_dir, key + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another multifd recv is writing {self.path}") from None
        self._fd = fd
        self._remove_strays()

    def hidden_name(self) -> str:
        """A fresh name for a copy in the making, next to DEST; the next holder of
        this lock removes it if it is left behind."""
        return os.path.join(self.dir, f"{self._prefix()}{uuid.uuid4().hex[:8]}")

    def _prefix(self) -> str:
        return f".{self.name}.multifd-"

    def _remove_strays(self) -> None:
        """Remove what a killed recv of this DEST left: a copy in the making under a
        hidden name (where O_TMPFILE is missing, or between naming steps) or a
        staging directory. Safe under DEST's lock: no other recv uses these names."""
        prefix = self._prefix()
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            if n.startswith(prefix) and len(n) == len(prefix) + 8:
                log.info("removing %s, left by an earlier recv of %s", n, self.path)
                remove_path(os.path.join(self.dir, n))

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
