"""Giving a finished copy its name, atomically, and taking it back on failure.

A copy is written unnamed (or under a hidden name) and gets DEST's name in one
rename at the end: a file directly, several blocks through a staging directory
that replaces DEST whole. Until the directory fsync succeeded, whatever was at
DEST before can still be put back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Callable, Sequence

from multifd_cli.common.fsutil import exchange, fsync_dir, link_fd, rename_noreplace
from multifd_cli.errors import IOFailure


class Naming:
    """Put a finished copy, already named `aside`, at `target`.

    What was at `target` survives (swapped to `aside`) until commit(), so a
    failure up to and including the directory fsync can undo() the whole
    step. Where our copy is, is read from inodes, not from which step ran:
    undo() is right whatever step a signal interrupted.
    """

    def __init__(self, aside: str, target: str, key: tuple[int, int], keep_aside: bool) -> None:
        self.aside = aside
        self.target = target
        self.key = key  # (st_dev, st_ino) of our copy
        self.keep_aside = keep_aside  # `aside` is our only name for the copy: undo keeps it

    def _ours(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.key

    def place(self, replace: bool) -> None:
        if not replace:
            rename_noreplace(self.aside, self.target)
            return
        try:
            exchange(self.aside, self.target)
        except FileNotFoundError:
            rename_noreplace(self.aside, self.target)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.replace(self.aside, self.target)  # no RENAME_EXCHANGE: cannot be undone

    def undo(self) -> None:
        """Put back what was at `target` (if anything); our copy returns to `aside`,
        or goes if `aside` was only a name made for this step."""
        with contextlib.suppress(OSError):
            if self._ours(self.target):
                if not os.path.lexists(self.aside):
                    os.rename(self.target, self.aside)
                elif not self._ours(self.aside):
                    exchange(self.aside, self.target)  # the old copy goes back
                else:
                    remove_path(self.target)  # a second name of ours
            if self._ours(self.aside) and not self.keep_aside:
                remove_path(self.aside)

    def commit(self) -> None:
        """Drop what the exchange swapped out."""
        if os.path.lexists(self.aside) and not self._ours(self.aside):
            remove_path(self.aside)


def remove_path(path: str) -> None:
    """Remove what an exchange swapped out, or a stray: a directory or a file."""
    if os.path.isdir(path) and not os.path.islink(path):
        if os.geteuid() != 0:
            _make_writable(path)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _make_writable(path: str) -> None:
    """Without root a directory a tree copy made read-only (0555) cannot lose its
    entries: give each directory below PATH u+rwx, top-down, never through a symlink."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(top, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)


def publish_file(fd: int, aside: str | None, hidden: str, target: str, *, replace: bool) -> Naming:
    """Name the file open as `fd` `target`; the caller commits or undoes.

    `aside` is the file's hidden name if it has one (no O_TMPFILE there);
    otherwise it is first linked to the fresh hidden name `hidden`.
    """
    st = os.fstat(fd)
    naming = Naming(aside or hidden, target, (st.st_dev, st.st_ino), keep_aside=aside is not None)
    try:
        if aside is None:
            link_fd(fd, naming.aside)
        naming.place(replace)
    except FileExistsError:
        naming.undo()
        raise IOFailure(f"{target} appeared during the migration; not replacing it") from None
    except OSError as e:
        naming.undo()
        raise IOFailure(f"cannot name the destination {target}: {e.strerror}") from None
    except BaseException:
        naming.undo()
        raise
    return naming


def publish_dir(
    members: Sequence[tuple[str, int, Callable[[], str | None]]],
    staging: str,
    target: str,
    *,
    replace: bool,
) -> Naming:
    """Name every member inside a staging directory, then put it at `target` in one step.

    A member is (relative name, fd, a call that hands over its hidden name if
    it has one: the file is then renamed, not linked, into the staging directory).
    """
    naming: Naming | None = None
    try:
        os.mkdir(staging, 0o755)
        st = os.lstat(staging)
        naming = Naming(staging, target, (st.st_dev, st.st_ino), keep_aside=False)
        dirs = {staging}
        for name, fd, take_hidden in members:
            path = os.path.join(staging, name)
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            dirs.add(parent)
            tmp = take_hidden()
            if tmp is None:
                link_fd(fd, path)
            else:
                os.rename(tmp, path)
        for d in sorted(dirs, key=len, reverse=True):
            fsync_dir(d)
        naming.place(replace)
    except BaseException as e:
        if naming is not None:
            naming.undo()
        else:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, FileExistsError):
            raise IOFailure(f"{target} appeared during the migration; not replacing it") from None
        if isinstance(e, OSError):
            raise IOFailure(
                f"cannot put the destination directory in place: {e.strerror}"
            ) from None
        raise
    return naming
