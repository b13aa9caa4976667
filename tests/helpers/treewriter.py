"""A process that keeps changing a tree's shape, as a service's data directory does:
it creates files, appends to them, saves them atomically (a temporary file renamed over
the old name), renames files and directories, hard-links, symlinks (some dangling),
changes modes, and deletes files and whole directories, at a given rate.

It is the only writer of its tree, so it keeps the tree's list in memory (read once at
start). After every operation it rewrites a status file outside the tree with one
pwrite: a JSON object counting each kind of operation it completed, so a test can say
which kinds happened between two instants even while this process is stopped.

    treewriter.py ROOT --status FILE [--rate OPS_PER_S] [--seed N] [--files N] [--only K,..]
    treewriter.py ROOT --populate N [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from typing import Callable

STATUS_BYTES = 1024
MAX_FILE = 256 << 10
MODES = (0o644, 0o600, 0o640, 0o755, 0o444, 0o664)
DIR_MODES = (0o755, 0o700, 0o750, 0o775)


class Tree:
    """The writer's picture of ROOT: relative paths of files, symlinks and directories
    ("" is ROOT)."""

    def __init__(self, root: str, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.files: set[str] = set()
        self.links: set[str] = set()
        self.dirs: set[str] = {""}
        self.serial = 0
        for top, dnames, fnames in os.walk(root):
            rel = os.path.relpath(top, root)
            rel = "" if rel == "." else rel
            for name in dnames + fnames:  # a symlink to a directory is in dnames
                p = os.path.join(rel, name)
                if os.path.islink(self.abs(p)):
                    self.links.add(p)
                else:
                    (self.dirs if name in dnames else self.files).add(p)

    def abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def new_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{os.getpid()}-{self.serial}"

    def pick_dir(self) -> str:
        return self.rng.choice(sorted(self.dirs))

    def pick_file(self) -> str | None:
        return self.rng.choice(sorted(self.files)) if self.files else None

    def content(self, lo: int, hi: int) -> bytes:
        n = self.rng.randint(lo, hi)
        return self.rng.randbytes(n)

    # -- the operations; each returns its kind, or None when it had nothing to act on --

    def create(self) -> str:
        p = os.path.join(self.pick_dir(), self.new_name("f"))
        fd = os.open(self.abs(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.rng.choice(MODES))
        try:
            os.write(fd, self.content(0, 16 << 10))
        finally:
            os.close(fd)
        self.files.add(p)
        return "create"

    def append(self) -> str | None:
        p = self.pick_file()
        if p is None or os.stat(self.abs(p)).st_size > MAX_FILE:
            return self.save()
        os.chmod(self.abs(p), os.stat(self.abs(p)).st_mode | 0o200)
        with open(self.abs(p), "ab") as f:
            f.write(self.content(1, 8 << 10))
        return "append"

    def save(self) -> str | None:
        p = self.pick_file()
        if p is None:
            return None
        tmp = os.path.join(os.path.dirname(p), "." + self.new_name("tmp"))
        fd = os.open(self.abs(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.rng.choice(MODES))
        try:
            os.write(fd, self.content(0, 32 << 10))
        finally:
            os.close(fd)
        os.rename(self.abs(tmp), self.abs(p))
        return "save"

    def rename(self) -> str | None:
        p = self.pick_file()
        if p is None:
            return None
        q = os.path.join(self.pick_dir(), self.new_name("r"))
        os.rename(self.abs(p), self.abs(q))
        self.files.discard(p)
        self.files.add(q)
        return "rename"

    def rename_dir(self) -> str | None:
        movable = sorted(d for d in self.dirs if d)
        if not movable:
            return None
        d = self.rng.choice(movable)
        parents = [x for x in sorted(self.dirs) if x != d and not x.startswith(d + "/")]
        q = os.path.join(self.rng.choice(parents), self.new_name("D"))
        os.rename(self.abs(d), self.abs(q))

        def moved(x: str) -> str:
            return q + x[len(d):] if x == d or x.startswith(d + "/") else x
        self.dirs = {moved(x) for x in self.dirs}
        self.files = {moved(x) for x in self.files}
        self.links = {moved(x) for x in self.links}
        return "rename_dir"

    def link(self) -> str | None:
        p = self.pick_file()
        if p is None:
            return None
        q = os.path.join(self.pick_dir(), self.new_name("h"))
        os.link(self.abs(p), self.abs(q))
        self.files.add(q)
        return "link"

    def symlink(self) -> str:
        d = self.pick_dir()
        choices = [*sorted(self.files)[:50], *sorted(self.dirs)[:10], "no/such/target"]
        target = self.rng.choice(choices)
        q = os.path.join(d, self.new_name("s"))
        # Relative to the link's own directory, so the copy's links point into the copy.
        os.symlink(os.path.relpath(self.abs(target), self.abs(d)), self.abs(q))
        self.links.add(q)
        return "symlink"

    def unlink(self) -> str | None:
        pool = sorted(self.files) + sorted(self.links)
        if not pool:
            return None
        p = self.rng.choice(pool)
        os.unlink(self.abs(p))
        self.files.discard(p)
        self.links.discard(p)
        return "unlink"

    def mkdir(self) -> str:
        q = os.path.join(self.pick_dir(), self.new_name("d"))
        os.mkdir(self.abs(q))
        os.chmod(self.abs(q), self.rng.choice(DIR_MODES))
        self.dirs.add(q)
        return "mkdir"

    def rmdir(self) -> str | None:
        # Leaves only: a small directory goes with what it holds.
        leaves = sorted(d for d in self.dirs
                        if d and not any(x.startswith(d + "/") for x in self.dirs))
        if len(leaves) < 3:
            return None
        d = self.rng.choice(leaves)
        shutil.rmtree(self.abs(d))
        self.dirs.discard(d)
        self.files = {x for x in self.files if not x.startswith(d + "/")}
        self.links = {x for x in self.links if not x.startswith(d + "/")}
        return "rmdir"

    def chmod(self) -> str | None:
        p = self.pick_file()
        if p is None:
            return None
        os.chmod(self.abs(p), self.rng.choice(MODES))
        return "chmod"

    def step(self, target_files: int, only: set[str]) -> str | None:
        """One operation, drawn so the tree stays near TARGET_FILES files (of the kinds
        in ONLY, when given)."""
        over = len(self.files) > target_files
        under = len(self.files) < target_files * 0.8
        weights = {
            self.create: 1 if over else 10 if under else 4, self.append: 4, self.save: 3, self.rename: 3,
            self.rename_dir: 1, self.link: 1, self.symlink: 1, self.unlink: 5 if over else 2,
            self.mkdir: 1, self.rmdir: 1 if len(self.dirs) > 12 else 0, self.chmod: 1,
        }
        fns = [f for f in weights if not only or f.__name__ in only]
        fn = self.rng.choices(fns, [weights[f] for f in fns])[0]
        return fn()


def populate(root: str, n: int, rng: random.Random) -> None:
    os.makedirs(root, exist_ok=True)
    tree = Tree(root, rng)
    for _ in range(max(1, n // 30)):
        tree.mkdir()
    for _ in range(n):
        tree.create()
    for _ in range(max(1, n // 20)):
        tree.link()
        tree.symlink()


def writer_args() -> argparse.ArgumentParser:
    """The arguments every writer script takes (xattrwriter.py too)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--status")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--populate", type=int, default=0)
    return ap


def main() -> None:
    ap = writer_args()
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated kinds (default: all)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    if a.populate:
        populate(a.root, a.populate, rng)
        return
    tree = Tree(a.root, rng)
    only = set(filter(None, a.only.split(",")))
    run_at_rate(lambda: tree.step(a.files, only), a.status, a.rate)


def run_at_rate(step: Callable[[], str | None], status: str, rate: float) -> None:
    """Call STEP RATE times a second, forever, counting the kinds it returns in STATUS
    (xattrwriter.py runs its own steps with it too)."""
    counts = {"ops": 0}
    fd = os.open(status, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    period = 1.0 / rate
    due = time.monotonic()
    while True:
        kind = step()
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
            counts["ops"] += 1
            text = json.dumps(counts).encode()
            os.pwrite(fd, text.ljust(STATUS_BYTES), 0)
        due += period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            due = time.monotonic()  # after a stop, do not rush to catch up


if __name__ == "__main__":
    main()
