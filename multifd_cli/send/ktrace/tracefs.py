"""A private tracefs instance, reached without touching the system's mounts.

Everything send does to tracing happens inside `instances/multifd-<pid>`: its
own buffer, clock, event enables and filters. The top-level tracing state
(tracing_on, current_tracer, events/*/enable) belongs to whoever else traces
this machine and is never written.

tracefs is often not mounted. Rather than mount it for the whole system, send
asks for a detached mount (fsopen/fsmount, Linux 5.2+): a mount that lives only
as long as our file descriptor and appears in no namespace, so nothing needs
undoing even after a SIGKILL. Where the new mount API is missing, a helper
process mounts tracefs inside its own private mount namespace and hands back a
directory descriptor over a socket; the mount dies with the last descriptor.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import subprocess
import sys
import time
from typing import Iterator

INSTANCE_PREFIX = "multifd-"
_INSTANCE_RE = re.compile(r"^multifd-(\d+)(?:-[0-9a-z]+)?$")

# x86-64 and aarch64 share these numbers (the "generic" syscall table since 5.2).
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1

_KNOWN_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


class TracefsUnavailable(Exception):
    """tracefs cannot be reached; the message is the one-line reason."""


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def _mounted_tracefs() -> str | None:
    """A tracefs mount point already visible to us, if any."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    points = set()
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        if post.split()[:1] == ["tracefs"] and len(fields) > 4:
            points.add(fields[4])
    for p in _KNOWN_MOUNTS:
        if p in points:
            return p
    return next(iter(sorted(points)), None)


def _detached_mount() -> int:
    """A tracefs mount that belongs to no namespace: an O_PATH fd to its root."""
    lib = _libc()
    fs = lib.syscall(_SYS_FSOPEN, b"tracefs", _FSOPEN_CLOEXEC)
    if fs < 0:
        raise OSError(ctypes.get_errno(), "fsopen(tracefs)")
    try:
        if lib.syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            raise OSError(ctypes.get_errno(), "fsconfig(tracefs)")
        mnt = lib.syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, 0)
        if mnt < 0:
            raise OSError(ctypes.get_errno(), "fsmount(tracefs)")
        return int(mnt)
    finally:
        os.close(fs)


# Run by a short-lived helper: the namespace and its mount are private to it,
# and the descriptor it sends back keeps the (by then detached) mount alive.
_NAMESPACE_HELPER = r"""
import ctypes, os, socket, sys
lib = ctypes.CDLL(None, use_errno=True)
if lib.unshare(0x00020000) != 0:
    sys.exit("unshare(CLONE_NEWNS): " + os.strerror(ctypes.get_errno()))
if lib.mount(b"none", b"/", None, 0x40000 | 0x4000, None) != 0:
    sys.exit("making mounts private: " + os.strerror(ctypes.get_errno()))
if lib.mount(b"nodev", b"/sys/kernel/tracing", b"tracefs", 0, None) != 0:
    sys.exit("mount tracefs: " + os.strerror(ctypes.get_errno()))
fd = os.open("/sys/kernel/tracing", os.O_RDONLY | os.O_DIRECTORY)
s = socket.socket(fileno=int(sys.argv[1]))
socket.send_fds(s, [b"ok"], [fd])
"""


def _namespace_mount() -> int:
    """tracefs mounted in a helper's private mount namespace, handed back as an fd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _NAMESPACE_HELPER, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        theirs.close()
        if proc.returncode != 0:
            raise OSError(errno.EPERM, proc.stderr.strip().splitlines()[-1:] or "helper failed")
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        if not fds:
            raise OSError(errno.EIO, "helper sent no descriptor")
        return fds[0]
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()


def open_root(method: str = "auto") -> tuple[int, str]:
    """A directory fd for the tracefs root, and how it was reached.

    `method` is auto, mounted, detached or namespace; tests force each one.
    """
    tried: list[str] = []
    if method in ("auto", "mounted"):
        point = _mounted_tracefs()
        if point is not None:
            return os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), f"mounted:{point}"
        tried.append("no tracefs mount")
    if method in ("auto", "detached"):
        try:
            mnt = _detached_mount()
        except OSError as e:
            tried.append(f"fsmount: {e.strerror or e}")
        else:
            try:
                return os.open(
                    ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mnt
                ), "detached"
            finally:
                os.close(mnt)
    if method in ("auto", "namespace"):
        try:
            return _namespace_mount(), "namespace"
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"private namespace: {getattr(e, 'strerror', None) or e}")
    raise TracefsUnavailable("no tracefs (" + "; ".join(tried) + ")")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(root: int, name: str, attempts: int = 50) -> None:
    """rmdir an instance; EBUSY means a reader is still closing, so retry briefly."""
    for i in range(attempts):
        try:
            os.rmdir(f"instances/{name}", dir_fd=root)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or i == attempts - 1:
                raise
            time.sleep(0.02)


def sweep_stale(root: int) -> list[str]:
    """Remove instances left by a send that was killed; returns their names.

    An instance is ours if its name is multifd-<pid>[-tag]; it is stale when
    that PID is gone. A live PID, even a reused one, is left alone.
    """
    removed = []
    for name in list_instances(root):
        m = _INSTANCE_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            _remove(root, name, attempts=5)
        except OSError:
            continue  # another sweeper won, or a reader lingers; the next start retries
        removed.append(name)
    return removed


def list_instances(root: int) -> list[str]:
    fd = os.open("instances", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


# Started in its own session, so a SIGKILL of send's whole process group spares
# it. It holds only the read end of a pipe whose write end lives in send: EOF
# means send (and anything that inherited the write end) is gone.
_GUARDIAN = r"""
import errno, os, sys, time
root, rd, name = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3]).decode()
while True:
    try:
        if not os.read(rd, 4096):
            break
    except InterruptedError:
        continue
for _ in range(250):
    try:
        os.rmdir("instances/" + name, dir_fd=root)
        break
    except FileNotFoundError:
        break
    except OSError as e:
        if e.errno != errno.EBUSY:
            break
        time.sleep(0.02)
"""


class Guardian:
    """Removes an instance once its owner is gone, however it went."""

    def __init__(self, root: int, name: str) -> None:
        rd, self._wr = os.pipe()
        try:
            self.proc = subprocess.Popen(
                # The name in hex: its command line must not pass for one of send's
                # channels (tools and tests find those by "multifd" in it).
                [sys.executable, "-c", _GUARDIAN, str(root), str(rd), name.encode().hex()],
                pass_fds=(root, rd),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(rd)

    def release(self, wait: bool = True) -> None:
        """The owner closed cleanly: let the guardian go (it finds nothing to remove).

        `wait=False` when the instance is still there because a forked child holds
        an fd into it: the guardian then outlives us and removes it once the last
        holder of the pipe's write end, that child included, is gone."""
        if self._wr >= 0:
            os.close(self._wr)
            self._wr = -1
            if not wait:
                return
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Instance:
    """One tracefs instance: created on open, removed on close, whatever happened."""

    def __init__(self, root: int, name: str) -> None:
        if _INSTANCE_RE.match(name) is None:
            raise ValueError(f"instance name {name!r} is not multifd-<pid>[-tag]")
        self.root = root
        self.name = name
        try:
            os.mkdir(f"instances/{name}", dir_fd=root)
        except FileExistsError:
            # Our own PID: a previous tracker of this process died without closing.
            _remove(root, name)
            os.mkdir(f"instances/{name}", dir_fd=root)
        self.dir = os.open(f"instances/{name}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
        self._open: list[int] = []

    def write(self, rel: str, value: str) -> None:
        fd = os.open(rel, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=self.dir)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def read(self, rel: str) -> str:
        fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
        finally:
            os.close(fd)

    def exists(self, rel: str) -> bool:
        try:
            os.stat(rel, dir_fd=self.dir)
        except FileNotFoundError:
            return False
        return True

    def open_fd(self, rel: str, flags: int) -> int:
        """An fd the instance tracks, so close() can drop it before the rmdir."""
        fd = os.open(rel, flags | os.O_CLOEXEC, dir_fd=self.dir)
        self._open.append(fd)
        return fd

    def cpus(self) -> Iterator[int]:
        fd = os.open("per_cpu", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.dir)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        for n in sorted(names):
            if n.startswith("cpu") and n[3:].isdigit():
                yield int(n[3:])

    def close(self) -> bool:
        """Drop every fd into the instance, then remove it. False when it stays busy:
        a process forked while it was open (a channel) still holds an fd into it,
        as on Ctrl-C of the whole group, where the channels exit after us."""
        for fd in self._open:
            try:
                os.close(fd)
            except OSError:
                pass
        self._open.clear()
        if self.dir >= 0:
            os.close(self.dir)
            self.dir = -1
            try:
                _remove(self.root, self.name)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                return False
        return True
