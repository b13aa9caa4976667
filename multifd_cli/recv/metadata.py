"""A file's metadata at completion: --preserve's, or the mode a new file gets."""

from __future__ import annotations

import logging
import os

from multifd_cli.wire import Metadata

log = logging.getLogger("multifd")


def apply_metadata(fd: int, m: Metadata) -> None:
    """--preserve: mode, owner (as root), extended attributes, then mtime last."""
    if os.geteuid() == 0:
        os.fchown(fd, m.uid, m.gid)  # first: chown clears setuid/setgid bits
    os.fchmod(fd, m.mode & 0o7777)
    for name, value in m.xattrs:
        try:
            os.setxattr(fd, name, value)
        except OSError as e:
            log.warning("cannot set xattr %s: %s", name.decode(errors="replace"), e.strerror)
    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))


def apply_default_mode(fd: int) -> None:
    """A new file made by O_TMPFILE is 0600: give it what a plain create would."""
    os.fchmod(fd, 0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
