"""The sources of a migration: paged blocks (files and block devices) and the
blob client's blobs, with how each is named, opened, sized and described."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Sequence

from multifd_cli import wire as P
from multifd_cli.errors import IOFailure, ProtocolError, UsageError

log = logging.getLogger("multifd")


@dataclass
class Source:
    path: str
    name: str
    fd: int
    size: int
    allocated: int
    is_block_device: bool

    def stat_key(self) -> tuple[int, int, int]:
        st = os.fstat(self.fd)
        return (self._size(st), st.st_mtime_ns, st.st_ctime_ns)

    def _size(self, st: os.stat_result) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return st.st_size

    def current_size(self) -> int:
        return self.stat_key()[0]

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the file we read."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)

    def check_identity(self) -> None:
        """The path must still name the file we read. A file renamed over SRC, or
        SRC deleted, would otherwise be copied and verified as it was: a copy of
        something nobody sees any more."""
        check_still_named(self.path, self.identity)


def check_still_named(path: str, identity: tuple[int, int], follow: bool = True) -> None:
    """IOFailure (exit 7) unless PATH still names the file (st_dev, st_ino) IDENTITY:
    a SOURCE named on the command line is that file, not whatever later takes its name."""
    try:
        now = os.stat(path, follow_symlinks=follow)
    except FileNotFoundError:
        raise IOFailure(f"source {path} was deleted during the migration") from None
    except OSError as e:
        raise IOFailure(f"source {path}: {e.strerror}") from None
    if (now.st_dev, now.st_ino) != identity:
        raise IOFailure(
            f"source {path} was replaced during the migration (a file was renamed "
            "over it): start again to copy the new file"
        )


def source_names(args: Sequence[str]) -> list[tuple[str, str]]:
    """(path, block name) per SOURCE argument: `PATH=NAME`, or the path relative
    to the sources' common directory (just the file name for one source)."""
    pairs = []
    for arg in args:
        if "=" in arg and not os.path.exists(arg):
            path, name = arg.rsplit("=", 1)
            pairs.append((path, name))
        else:
            pairs.append((arg, ""))
    dirs = [os.path.dirname(os.path.abspath(p)) for p, name in pairs if not name]
    root = os.path.commonpath(dirs) if dirs else ""
    out = []
    for path, name in pairs:
        name = name or os.path.relpath(os.path.abspath(path), root)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(
                f"source {path!r}: its name is not UTF-8; give it one with SOURCE=NAME"
            ) from None
        try:
            P.check_block_name(name)
        except ProtocolError as e:
            raise UsageError(f"source {path}: {e.message}") from None
        out.append((path, name))
    names = [n for _, n in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two sources would both be named {dup!r}: use SOURCE=NAME")
    try:
        P.check_block_names(names)
    except ProtocolError as e:
        raise UsageError(f"source names: {e.message}") from None
    return out


def open_source(path: str, name: str = "") -> Source:
    """Open and stat one source; refuse what cannot be migrated, with the reason."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it is refused.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"source {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"source {path} is a directory") from None
    except OSError as e:
        raise IOFailure(f"cannot open source {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise UsageError(f"source {path} is a directory")
    blk = stat.S_ISBLK(st.st_mode)
    if not (blk or stat.S_ISREG(st.st_mode)):
        os.close(fd)
        raise UsageError(f"source {path} is neither a regular file nor a block device")
    size = os.lseek(fd, 0, os.SEEK_END) if blk else st.st_size
    if not blk and size == 0 and os.pread(fd, 1, 0):
        os.close(fd)
        raise UsageError(f"source {path} says it is empty but has data (a /proc or /sys file?): "
                         "copy it to a regular file first")
    allocated = size if blk else min(size, st.st_blocks * 512)
    return Source(path, name or os.path.basename(path), fd, size, allocated, blk)


@dataclass
class Blob:
    """A blob client's unit (the device-state analog): produced after the pause,
    sent whole, so it has nothing to flush."""

    name: str
    cmd: str = ""
    path: str = ""
    produced: str = ""  # the file the channels read it from, once produced
    size: int = 0

    def produce(self) -> None:
        """Run --state-cmd (its stdout is the blob) or take --state-file, after the pause."""
        if self.path:
            self.produced = self.path
        else:
            fd, self.produced = tempfile.mkstemp(prefix="multifd-state-")
            try:
                proc = subprocess.run(
                    self.cmd, shell=True, stdin=subprocess.DEVNULL, stdout=fd,
                    stderr=subprocess.PIPE, timeout=300,
                )
            except subprocess.TimeoutExpired:
                raise IOFailure(f"--state-cmd {self.cmd!r} did not finish within 300 s") from None
            finally:
                os.close(fd)
            for line in proc.stderr.decode(errors="replace").splitlines():
                log.info("state command: %s", line)
            if proc.returncode != 0:
                raise IOFailure(f"--state-cmd {self.cmd!r} exited with status {proc.returncode}")
        try:
            self.size = os.path.getsize(self.produced)
        except OSError as e:
            raise IOFailure(f"cannot read the state {self.produced}: {e.strerror}") from None

    def cleanup(self) -> None:
        if self.cmd and self.produced:
            with contextlib.suppress(OSError):
                os.unlink(self.produced)


def read_metadata(block: int, src: Source) -> P.Metadata:
    """What --preserve carries: mode, owner, mtime and extended attributes."""
    st = os.fstat(src.fd)
    xattrs: list[tuple[bytes, bytes]] = []
    try:
        names = os.listxattr(src.fd)
    except OSError:
        names = []
    for name in names[: P.MAX_XATTRS]:
        try:
            value = os.getxattr(src.fd, name)
        except OSError:
            continue
        if len(value) <= P.MAX_XATTR_VALUE:
            xattrs.append((name.encode(), value))
    return P.Metadata(block, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, tuple(xattrs))
