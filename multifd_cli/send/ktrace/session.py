"""The kernel side of a tracker: one private instance, its guardian, pipe and marker.

It knows how to set the instance up and read it; what the events mean for a
pass is the tracker's business.
"""

from __future__ import annotations

import errno
import os

from multifd_cli.send.ktrace import bio, parse, tracefs

_STAT_COUNTERS = ("overrun:", "commit overrun:", "dropped events:")


def check_format(inst: tracefs.Instance) -> str | None:
    """Why the folio event cannot be read here; None if its text is the one we parse."""
    rel = f"events/{parse.FOLIO_EVENT}/format"
    if not inst.exists(rel):
        return "the kernel has no writeback_dirty_folio tracepoint"
    fmt = [ln for ln in inst.read(rel).splitlines() if ln.startswith("print fmt:")]
    if not fmt or not fmt[0].startswith(f"print fmt: {parse.FOLIO_FORMAT}"):
        return "writeback_dirty_folio prints a format this tracker does not know"
    return None


class TraceSession:
    """A configured instance being read; close() removes it whatever happened."""

    def __init__(self, name: str, *, root_method: str, guardian: bool) -> None:
        self.root, self.method = tracefs.open_root(root_method)
        self.guardian: tracefs.Guardian | None = None
        self.inst: tracefs.Instance | None = None
        self.split = parse.LineSplitter()
        self.overruns = 0
        try:
            self.swept = tracefs.sweep_stale(self.root)
            if guardian:
                # Before the instance exists, so no moment is left unguarded.
                self.guardian = tracefs.Guardian(self.root, name)
            self.inst = tracefs.Instance(self.root, name)
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        assert self.inst is not None
        return self.inst.name

    def configure(self, buffer_kb: int, inodes: list[int], disks: list[int]) -> None:
        """The file tracker's events: folios and no-page changes of these inodes, and
        the block events of these disks."""
        filt = parse.inode_filter(inodes)
        filters = {ev: filt for ev in (parse.FOLIO_EVENT, *parse.NOPAGE_EVENTS)}
        if disks:
            # No sector filter: a new extent allocated after it was set would be missed.
            # Our own writeback's bios are told apart later, by thread id.
            dev_filt = " || ".join(f"dev == {bio.kernel_dev(d)}" for d in disks)
            filters[bio.QUEUE_EVENT] = filters[bio.COMPLETE_EVENT] = dev_filt
        self.start(buffer_kb, filters, optional=parse.NOPAGE_EVENTS)

    def start(self, buffer_kb: int, filters: dict[str, str],
              optional: tuple[str, ...] = ()) -> list[str]:
        """Clock, buffer, filters and enables, all inside the instance; then open it.

        An `optional` event the kernel lacks is left out; the others must exist.
        Returns the events enabled.
        """
        inst = self.inst
        assert inst is not None
        bad = check_format(inst)
        if bad:
            raise tracefs.TracefsUnavailable(bad)
        for clock in ("mono", "global"):
            try:
                inst.write("trace_clock", clock)
                break
            except OSError:
                continue
        else:
            # The default, local, is not ordered across CPUs: the marker would not split.
            raise tracefs.TracefsUnavailable("the instance takes neither mono nor global clock")
        inst.write("buffer_size_kb", str(buffer_kb))
        enabled = []
        for ev, filt in filters.items():
            if ev in optional and not inst.exists(f"events/{ev}/enable"):
                continue
            inst.write(f"events/{ev}/filter", filt)
            inst.write(f"events/{ev}/enable", "1")
            enabled.append(ev)
        inst.write("tracing_on", "1")
        self._pipe = inst.open_fd("trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        self._marker = inst.open_fd("trace_marker", os.O_WRONLY)
        self.overruns = self.read_overruns()
        return enabled

    def mark(self, text: str) -> None:
        os.write(self._marker, text.encode())

    def read_lines(self) -> list[str]:
        """Whatever the pipe holds now, as whole lines; never blocks."""
        lines: list[str] = []
        while True:
            try:
                data = os.read(self._pipe, 1 << 16)
            except BlockingIOError:
                return lines
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return lines
            lines.extend(self.split.feed(data))

    def read_overruns(self) -> int:
        """Events the ring buffer lost so far, over all CPUs."""
        assert self.inst is not None
        total = 0
        for cpu in self.inst.cpus():
            for line in self.inst.read(f"per_cpu/cpu{cpu}/stats").splitlines():
                for key in _STAT_COUNTERS:
                    if line.startswith(key):
                        total += int(line[len(key) :].split()[0])
        return total

    def close(self) -> None:
        """Remove the instance, release the guardian, drop the root; safe to call twice."""
        removed = True
        try:
            if self.inst is not None:
                inst, self.inst = self.inst, None
                removed = inst.close()
        finally:
            if self.guardian is not None:
                # Still busy: the guardian removes it once the fd's holder is gone.
                self.guardian.release(wait=removed)
                self.guardian = None
            if self.root >= 0:
                os.close(self.root)
                self.root = -1
