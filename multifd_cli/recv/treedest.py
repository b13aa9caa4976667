"""A directory tree's destination: what recv refuses, the staging directory, and the
one rename that makes the copy DEST.

The tree is built in a hidden directory beside DEST (same filesystem), named like
every other copy in the making (recv/destlock.py), so the next recv of this DEST
removes what a killed one left. It holds two directories:

- ``tree``: the staging tree, which becomes DEST in one rename at the end;
- ``ids``: every regular file under its hex file id, a hard link of its tree paths,
  which the channels write pages through (recv/tree.py, recv/treepages.py).

On any failure the hidden directory goes and DEST is untouched. At completion:
DIRMETA is applied, the staging tree's manifest is compared with the source's, then
one syncfs, the rename (RENAME_NOREPLACE, or an exchange with --force), an fsync of
DEST's directory; the old tree and the id names go after COMPLETE.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid

from multifd_cli import wire as P
from multifd_cli.common.fsutil import fsync_dir, syncfs
from multifd_cli.common.manifest import ManifestOptions, walk_manifest
from multifd_cli.errors import IOFailure, UsageError, VerifyError
from multifd_cli.recv.blockfiles import Writeback
from multifd_cli.recv.naming import Naming, remove_path
from multifd_cli.recv.tree import TreeApplier
from multifd_cli.wire.treeops import skipped_warning

log = logging.getLogger("multifd")

BOOT_ID = "/proc/sys/kernel/random/boot_id"
MAIN_FD_CACHE = 64  # main's descriptors of files (META, TIMES); each channel has its own


def boot_id() -> bytes | None:
    """This host's boot id as 16 raw bytes, or None where the kernel does not say."""
    try:
        with open(BOOT_ID) as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return None


def ancestors(path: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the directory PATH and of every directory above it."""
    out: set[tuple[int, int]] = set()
    path = os.path.realpath(path)
    while True:
        st = os.stat(path)
        out.add((st.st_dev, st.st_ino))
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def check_tree_dest(path: str, root: P.TreeRoot, *, force: bool, resume: bool,
                    keep_partial: bool) -> None:
    """Refuse a tree session this DEST must not take (UsageError: exit 2)."""
    if resume:
        raise UsageError("recv --resume takes a file; the source is a directory tree")
    if keep_partial:
        raise UsageError("recv --keep-partial takes files; a directory tree appears whole "
                         "or not at all")
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not force:
            raise UsageError(f"destination {path} exists; use --force to replace it")
        if stat.S_ISBLK(st.st_mode):
            raise UsageError(f"{path} is a block device; the source is a directory tree")
    if boot_id() != root.boot_id:
        return  # another host: its (dev, ino) say nothing about ours
    if root.ids[0] in ancestors(os.path.dirname(path)):
        raise UsageError(f"destination {path} lies inside the source directory")
    if st is not None and (st.st_dev, st.st_ino) in root.ids:
        raise UsageError(f"the source directory lies inside the destination {path}")


class TreeDest:
    """The staging directory of one tree session, from creation to DEST or nothing."""

    def __init__(self, path: str, hidden: str, *, force: bool, xattrs: bool = False) -> None:
        self.path = path
        self.dir = os.path.dirname(path)
        self.hidden = hidden  # beside DEST; removed by the next recv if we are killed
        self.staging = os.path.join(hidden, "tree")
        self.force = force
        self.owners = os.geteuid() == 0  # keeps owners and makes device nodes
        self.xattrs = xattrs  # CONFIG_XATTRS: the manifest covers each entry's xattrs
        self.root_fd = -1
        self.ids_fd = -1
        self.applier: TreeApplier | None = None
        self.naming: Naming | None = None
        self.published = False
        self.writeback = Writeback()

    @property
    def accept_flags(self) -> int:
        return P.ACCEPT_OWNERS if self.owners else 0

    def check_space(self, needed: int) -> None:
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise IOFailure(f"not enough space in {self.dir}: need {needed} bytes, {free} are free")

    def create(self) -> TreeApplier:
        """Make the hidden directory with the staging root and the id directory."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            os.mkdir(self.hidden, 0o700)
            os.mkdir(self.staging, 0o700)
            os.mkdir(os.path.join(self.hidden, "ids"), 0o700)
            self.root_fd = os.open(self.staging, flags)
            self.ids_fd = os.open(os.path.join(self.hidden, "ids"), flags)
        except OSError as e:
            raise IOFailure(f"cannot create the staging directory {self.hidden}: {e.strerror}") from None
        self.applier = TreeApplier(self.root_fd, self.ids_fd, fd_cache=MAIN_FD_CACHE,
                                   keep_owner=self.owners, can_mknod=self.owners)
        return self.applier

    def background_flush(self) -> None:
        """Start writing back what the last pass wrote, so the final syncfs is short."""
        if self.root_fd >= 0:
            self.writeback.start((self.root_fd,), sync=syncfs)

    @property
    def flush_us(self) -> int:
        return self.writeback.last_us

    # -- completion --------------------------------------------------------------------------
    def verify(self, manifest: P.Manifest | None) -> None:
        """The staging tree's shape and metadata must be the source's at the pause."""
        if manifest is None:
            raise VerifyError("tree verification failed: no MANIFEST arrived before DIGEST")
        opts = ManifestOptions(mtimes=True, owners=self.owners, devices=self.owners,
                               xattrs=self.xattrs)
        try:
            # Every staged file also has its id name: without links_outside the walk
            # would remember every file's (dev, ino), ~170 bytes each.
            ours = walk_manifest(self.staging, opts, links_outside=1)
        except OSError as e:
            raise IOFailure(f"walking the staging tree: {e.strerror}") from None
        if (ours.count, ours.digest()) != (manifest.entries, manifest.digest):
            raise VerifyError(
                f"tree verification failed: the copy has {ours.count} entries with manifest "
                f"{ours.digest().hex()[:16]}, the source {manifest.entries} with "
                f"{manifest.digest.hex()[:16]}"
            )
        assert self.applier is not None
        warning = skipped_warning("device nodes (recv is not root)", self.applier.skipped)
        if warning:
            log.warning("%s", warning)

    def publish(self) -> None:
        """Make the staging tree durable and DEST, atomically; then fsync DEST's
        directory. On failure whatever was at DEST is put back."""
        self.writeback.wait()
        try:
            syncfs(self.root_fd)
        except OSError as e:
            raise IOFailure(f"syncfs of the destination failed: {e.strerror}") from None
        st = os.fstat(self.root_fd)
        naming = self.naming = Naming(self.staging, self.path, (st.st_dev, st.st_ino),
                                      keep_aside=False)
        try:
            naming.place(self.force)
            fsync_dir(self.dir)
        except BaseException as e:
            naming.undo()
            self.naming = None
            if isinstance(e, FileExistsError):
                raise IOFailure(f"{self.path} appeared during the migration; not replacing it") from None
            if isinstance(e, OSError):
                raise IOFailure(f"cannot put the tree in place at {self.path}: {e.strerror}") from None
            raise
        self.published = True

    def cleanup(self) -> None:
        """After COMPLETE (or a failure): the id names, the old tree swapped out with
        --force, the hidden directory. Before publish() that is the whole copy."""
        self.close()
        if os.path.lexists(self.hidden):
            remove_path(self.hidden)

    def close(self) -> None:
        self.writeback.join()  # it may still be flushing through root_fd
        if self.applier is not None:
            self.applier.close()
            self.applier = None
        for fd in (self.root_fd, self.ids_fd):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.ids_fd = -1
