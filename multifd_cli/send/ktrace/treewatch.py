"""The kernel tracker for a directory tree: a pass reads what was written, per file.

A tree's files come and go, so the trace cannot name their inodes. It watches
whole filesystems instead: the folio event filtered on the bdi under each
traced filesystem (the event carries the bdi's name, "major:minor" of the
disk), the no-page and direct-I/O events on the filesystem's dev. User space
keeps only the inodes the walk finds in the tree; an inode of another
filesystem on the same disk, or of a file outside the tree, only ever adds a
read, never hides one.

The pass start is the file tracker's order (window.MarkedTrace), with syncfs()
as the writeback: marker, then syncfs() on every traced filesystem, then drain.
syncfs() writes back and waits for every dirty folio of the filesystem, files
the walk has not seen yet included (created since the last walk), so after it
every folio of every tree file is clean and its next store, by write(2) or
through a shared mapping, emits an event after the marker. Per-file
sync_file_range would miss the new inodes whose paths nobody knows yet.

What each file costs is decided by treeplan.plan_file() from the window and
the two walks' stat; its docstring holds the argument. Files on a filesystem the
tracker cannot watch (tmpfs, btrfs, overlayfs, one mounted later) keep the
stat rule of send/tree: read whole when their stat moved or when a process
maps them shared and writable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from multifd_cli.common.fsutil import syncfs
from multifd_cli.send.ktrace import bio, parse, tracefs
from multifd_cli.send.ktrace.session import TraceSession
from multifd_cli.send.ktrace.tracker import DEFAULT_BUFFER_KB, MAX_FOLIO_BYTES
from multifd_cli.send.ktrace.watched import fs_reason
from multifd_cli.send.ktrace.window import MarkedTrace, Window, instance_tag

# Per CPU, as for files. recv writing its copy on the same disk floods pass 1's
# window with events of inodes outside the tree, but the pass drains every POLL_S
# and recv's writes fill large folios (an event per folio): a 1.4 GiB tree of
# 50,000 files copied on one disk overran none of its windows even at 512 KiB.
TREE_BUFFER_KB = DEFAULT_BUFFER_KB


def bdi_name(st_dev: int) -> str:
    """The name the folio event gives the bdi of a filesystem on device st_dev."""
    disk = bio.disk_of(st_dev).disk_dev
    name = f"{os.major(disk)}:{os.minor(disk)}"
    if not os.path.isdir(f"/sys/class/bdi/{name}"):
        raise bio.DirectUnavailable(f"no bdi {name} for device {os.major(st_dev)}:"
                                    f"{os.minor(st_dev)}")
    return name


def tree_fs_reason(directory: str) -> str | None:
    """Why the tree tracker cannot vouch for the files of the filesystem holding
    `directory`; None if it can."""
    why = fs_reason(directory)
    if why:
        return why
    try:
        bdi_name(os.stat(directory).st_dev)
    except (bio.DirectUnavailable, OSError) as e:
        return f"the folio events of {directory} cannot be told apart: {e}"
    return None


@dataclass
class TreeWindow:
    """What the trace said about the traced filesystems between two pass starts."""

    seq: int
    full: bool  # not trusted: the first pass, or events were lost
    reason: str
    folios: dict[int, set[int]]
    nopage: dict[int, str]
    events: int
    cost_s: float


class TreeKernelTracker(MarkedTrace):
    """One window per pass over whole filesystems; the tree's walk picks its inodes.

    `dirs` maps each traced filesystem's st_dev to a directory on it (for
    syncfs). `blind` and `safety_net=False` exist only for the negative
    controls, as in KernelTracker.
    """

    def __init__(
        self,
        dirs: Mapping[int, str],
        *,
        buffer_kb: int = TREE_BUFFER_KB,
        tag: str | None = None,
        root_method: str = "auto",
        guardian: bool = True,
        blind: bool = False,
        safety_net: bool = True,
        order: str = "sound",
        edge_hook: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(order, edge_hook)
        self.devs = frozenset(dirs)
        self.safety_net = safety_net
        self._blind = blind
        self._fds: list[int] = []
        self._sync_error = ""
        page = os.sysconf("SC_PAGE_SIZE")
        max_pages = max(MAX_FOLIO_BYTES // page, 1)
        self.extent: Callable[[int], tuple[int, int]] = lambda i: parse.folio_extent(
            i, page, max_pages)
        try:
            self._bdis = {bdi_name(d) for d in dirs}
            for d in dirs.values():
                self._fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            self._trace = TraceSession(instance_tag(tag), root_method=root_method,
                                       guardian=guardian)
        except BaseException:
            self._close_fds()
            raise
        try:
            self._start(buffer_kb)
        except BaseException:
            self.close()
            raise

    def _start(self, buffer_kb: int) -> None:
        folio = " || ".join(f'name == "{b}"' for b in sorted(self._bdis))
        devs = " || ".join(f"dev == {bio.kernel_dev(d)}" for d in sorted(self.devs))
        filters = {parse.FOLIO_EVENT: folio}
        filters.update({ev: devs for ev in (*parse.NOPAGE_EVENTS, *parse.DIO_EVENTS)})
        enabled = self._trace.start(buffer_kb, filters, optional=parse.DIO_EVENTS)
        if not set(parse.DIO_EVENTS) <= set(enabled):
            raise tracefs.TracefsUnavailable(
                "the kernel has no iomap direct-I/O tracepoints, so O_DIRECT writes to "
                "tree files would go unseen")

    def begin_pass(self, final: bool = False) -> TreeWindow:
        """Marker, syncfs, drain: the window since the last pass start, then the walk.

        `final` (the writers are paused, no window follows): no syncfs, which
        only serves the next window.
        """
        t0 = time.perf_counter()
        first = self._seq == 0
        self._sync_error = ""
        w: Window = self._close_window(lambda: None if final else self._syncfs())
        if self._sync_error:
            # Folios it left dirty emit nothing when stored to again: the window this
            # marker opens cannot be trusted (the next syncfs starts a sound one).
            self._window.lost.append(f"syncfs failed ({self._sync_error})")
        full = first or bool(w.lost)
        reason = "first pass" if first else "; ".join(dict.fromkeys(w.lost))
        return TreeWindow(self._seq, full, reason, w.folios, w.nopage, w.events,
                          time.perf_counter() - t0)

    def since_marker(self) -> set[int]:
        """Inodes with events after the last pass start's marker, drained now: the walk
        that followed the marker may have seen their writes' stat already."""
        self.poll()
        return set(self._window.folios) | set(self._window.nopage)

    def _syncfs(self) -> None:
        for fd in self._fds:
            try:
                syncfs(fd)
            except OSError as e:
                self._sync_error = e.strerror or str(e)

    def _ingest(self, win: Window, ev: parse.Event) -> bool:
        if isinstance(ev, parse.Folio):
            if not self._blind and ev.bdi in self._bdis:
                win.folios.setdefault(ev.ino, set()).add(ev.index)
                win.events += 1
            return False
        if isinstance(ev, parse.NoPage):
            if not self._blind:
                win.nopage[ev.ino] = ev.event
                win.events += 1
            return False
        return super()._ingest(win, ev)

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        """Remove the instance and drop every fd; safe to call twice."""
        try:
            if hasattr(self, "_trace"):
                self._trace.close()
        finally:
            self._close_fds()

    def __enter__(self) -> TreeKernelTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
