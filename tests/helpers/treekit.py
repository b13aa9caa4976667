"""Trees for the directory-source tests: an independent path-by-path comparison, the
shape-changing writer's handle, and the small process tools those tests share.

``compare_trees`` is deliberately written without multifd's own code (no manifest, no
scanner): it is the referee that says whether DEST is a replica of SOURCE, so it must not
share a bug with what it judges.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from helpers.mfdkit import assert_within, release

from multifd_cli.writer.pause import is_stopped

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]
TREEWRITER = HELPERS / "treewriter.py"
SQLITEWRITER = HELPERS / "sqlitewriter.py"

# -- the referee -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """What compare_trees looks at for one path (None where it does not apply)."""

    kind: str
    mode: int
    size: int | None
    mtime_ns: int | None
    target: bytes | None
    sha: str | None
    rdev: int | None
    uid: int
    gid: int


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISBLK, "blockdev"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _file_sha(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME
                 if os.geteuid() == 0 else os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def snapshot_tree(root: Path | str) -> tuple[dict[bytes, Node], set[frozenset[bytes]]]:
    """Every path under ROOT (b"." for ROOT itself) with its Node, and the hard-link
    groups: the sets of two or more relative paths that name one inode. Paths are bytes,
    so a name that is not UTF-8 is compared as it is."""
    base = os.fsencode(str(root))
    nodes: dict[bytes, Node] = {}
    inodes: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    stack = [b"."]
    while stack:
        rel = stack.pop()
        full = base if rel == b"." else os.path.join(base, rel)
        st = os.lstat(full)
        kind = _kind(st.st_mode)
        nodes[rel] = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            size=st.st_size if kind == "file" else None,
            mtime_ns=st.st_mtime_ns if kind in ("file", "dir") else None,
            target=os.readlink(full) if kind == "symlink" else None,
            sha=_file_sha(full) if kind == "file" else None,
            rdev=st.st_rdev if kind in ("chardev", "blockdev") else None,
            uid=st.st_uid,
            gid=st.st_gid,
        )
        if kind != "dir" and st.st_nlink > 1:
            inodes[(st.st_dev, st.st_ino)].append(rel)
        if kind == "dir":
            for name in os.listdir(full):
                stack.append(name if rel == b"." else os.path.join(rel, name))
    groups = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return nodes, groups


def _show(rel: bytes) -> str:
    return repr(os.fsdecode(rel))


def compare_trees(a: Path | str, b: Path | str, *, owners: bool) -> list[str]:
    """Every difference between the trees A and B, one line each, path by path: type,
    mode bits, size, mtime (files and directories, ROOT included), symlink target,
    content, device numbers, hard-link groups, and with OWNERS uid and gid. Empty when
    B is a replica of A."""
    na, ga = snapshot_tree(a)
    nb, gb = snapshot_tree(b)
    out: list[str] = []
    for rel in sorted(na.keys() - nb.keys()):
        out.append(f"{_show(rel)}: only in {a} ({na[rel].kind})")
    for rel in sorted(nb.keys() - na.keys()):
        out.append(f"{_show(rel)}: only in {b} ({nb[rel].kind})")
    fields = ["kind", "mode", "size", "mtime_ns", "target", "sha", "rdev"]
    if owners:
        fields += ["uid", "gid"]
    for rel in sorted(na.keys() & nb.keys()):
        x, y = na[rel], nb[rel]
        for f in fields:
            vx, vy = getattr(x, f), getattr(y, f)
            if f == "kind" and vx != vy:
                out.append(f"{_show(rel)}: type {vx} != {vy}")
                break
            if vx != vy:
                shown = (oct(vx), oct(vy)) if f == "mode" else (vx, vy)
                out.append(f"{_show(rel)}: {f} {shown[0]!r} != {shown[1]!r}")
    for g in sorted(ga - gb, key=sorted):
        out.append(f"hard-link group only in {a}: {sorted(map(os.fsdecode, g))}")
    for g in sorted(gb - ga, key=sorted):
        out.append(f"hard-link group only in {b}: {sorted(map(os.fsdecode, g))}")
    return out


def assert_replica(a: Path | str, b: Path | str, *, owners: bool) -> None:
    """Fail, listing the first differences, unless B is a replica of A."""
    diffs = compare_trees(a, b, owners=owners)
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs[:25])


# -- the shape-changing writer ---------------------------------------------------------------------


OP_KINDS = ("create", "append", "save", "rename", "rename_dir", "link", "symlink", "unlink",
            "mkdir", "rmdir", "chmod")


class TreeWriter:
    """tests/helpers/treewriter.py on ROOT in its own session. `counts()` reads how many
    operations of each kind it has completed (from a status file it rewrites with one
    pwrite after each, so a SIGSTOP never leaves it half written)."""

    def __init__(self, root: Path, status: Path, rate: int = 200, seed: int = 1,
                 files: int = 300, only: tuple[str, ...] = ()) -> None:
        self.status = status
        self.popen = subprocess.Popen(
            [sys.executable, str(TREEWRITER), str(root), "--status", str(status),
             "--rate", str(rate), "--seed", str(seed), "--files", str(files),
             "--only", ",".join(only)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert_within(lambda: self.counts().get("ops", 0) > 0 or self.popen.poll() is not None,
                      15, "the tree writer's first operation")
        assert self.popen.poll() is None, self.stderr()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def counts(self) -> dict[str, int]:
        try:
            text = self.status.read_bytes().rstrip(b" \n\0")
        except FileNotFoundError:
            return {}
        return dict(json.loads(text)) if text else {}

    def stderr(self) -> str:
        if self.popen.poll() is None or self.popen.stderr is None:
            return ""
        return self.popen.stderr.read().decode(errors="replace")

    def stopped(self) -> bool:
        return is_stopped(self.pid)

    def kill(self) -> None:
        if self.popen.poll() is None:
            release(self.pid)
        self.popen.wait(10)
        if self.popen.stderr is not None:
            self.popen.stderr.close()


def ops_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """How many operations of each kind happened between two `counts()`."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in OP_KINDS}


def populate(root: Path, files: int, seed: int = 1) -> None:
    """A starting tree for the writer: FILES small files over a few directories
    (created by the writer's own code, so the two agree on names)."""
    subprocess.run([sys.executable, str(TREEWRITER), str(root), "--populate", str(files),
                    "--seed", str(seed)], check=True, timeout=120)


# -- the SQLite writer -------------------------------------------------------------------------------


class SqliteWriter:
    """tests/helpers/sqlitewriter.py: commits transactions into DB (journal mode MODE)
    and states what it is doing in STATUS (see `state`)."""

    def __init__(self, db: Path, status: Path, mode: str, seed: int = 1) -> None:
        self.db, self.status = db, status
        self.popen = subprocess.Popen(
            [sys.executable, str(SQLITEWRITER), str(db), "--status", str(status),
             "--mode", mode, "--seed", str(seed)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert_within(lambda: self.commits() >= 3 or self.popen.poll() is not None, 30,
                      "the SQLite writer's first commits")
        assert self.popen.poll() is None, self.popen.stderr.read() if self.popen.stderr else ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def state(self) -> tuple[str, int, int]:
        """(what it is doing, commits so far, statements of the open transaction)."""
        words = self.status.read_text().split()
        return words[0], int(words[1]), int(words[2])

    def commits(self) -> int:
        try:
            return self.state()[1]
        except (FileNotFoundError, IndexError, ValueError):
            return 0

    def crash(self) -> None:
        """SIGKILL, stopped or not: a crash at whatever instant it is in."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)
        if self.popen.stderr is not None:
            self.popen.stderr.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            release(self.pid)
        self.crash()


# -- process tools ---------------------------------------------------------------------------------


@contextlib.contextmanager
def fd_limit(n: int) -> Iterator[None]:
    """Processes started inside inherit a soft RLIMIT_NOFILE of N (this one has it
    meanwhile, and gets its own back after)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    old = resource.prlimit(0, resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.prlimit(0, resource.RLIMIT_NOFILE, old)


def nofile_limit(pid: int) -> int:
    """The soft 'Max open files' of a running process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no open-files limit for {pid}")


def python_for(user: str) -> list[str] | None:
    """A command that runs multifd as USER (through runuser), or None when that user
    cannot run this checkout's Python (a pyenv under root's 0700 home, say): then the
    system python3 of the same version is tried with the venv's packages on PYTHONPATH."""
    site = [p for p in sys.path if p.endswith("site-packages") and str(ROOT) in p]
    pypath = ":".join([str(ROOT), *site])
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{ver}"):
        argv = ["runuser", "-u", user, "--", "env", f"PYTHONPATH={pypath}", "PYTHONUNBUFFERED=1",
                exe, "-m", "multifd_cli"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run([*argv, "--version"], capture_output=True, cwd="/",
                              timeout=30).returncode == 0:
                return argv
    return None
