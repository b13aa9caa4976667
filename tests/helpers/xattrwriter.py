"""A process that keeps changing a tree's extended attributes, as a service that tags
its files does: it sets new user.* names, changes values, removes names, renames files
that carry xattrs, appends to tagged files (their ctime moves, their set does not),
and tags directories, the root included, at a given rate.

It is the only writer of its tree (read once at start). After every operation it
rewrites a status file outside the tree with one pwrite, a JSON object counting each
kind of operation, so a test can tell which kinds happened even while it is stopped.

    xattrwriter.py ROOT --status FILE [--rate OPS_PER_S] [--seed N]
    xattrwriter.py ROOT --populate N [--seed N]
"""

from __future__ import annotations

import errno
import os
import random

from treewriter import run_at_rate, writer_args  # the same directory: sys.path[0]

KINDS = ("set", "change", "remove", "rename", "append", "dir")


def value(rng: random.Random) -> bytes:
    """Short or up to 1 KiB, sometimes not UTF-8, sometimes empty."""
    n = rng.choice((0, 3, 40, 1000))
    return bytes(rng.randrange(256) for _ in range(n))


def populate(root: str, n: int, rng: random.Random) -> None:
    for d in ("", "a", "b", "a/deep"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(n):
        path = os.path.join(root, rng.choice(("", "a", "b", "a/deep")), f"f{i:04}")
        with open(path, "wb") as f:
            f.write(os.urandom(rng.randrange(1, 9000)))
        for j in range(rng.randrange(0, 3)):
            os.setxattr(path, f"user.tag{j}", value(rng))
    os.setxattr(os.path.join(root, "a"), "user.dir", b"a")


class Tree:
    def __init__(self, root: str, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.files: list[str] = []
        self.dirs: list[str] = []
        for top, _, fnames in os.walk(root):
            self.dirs.append(top)
            self.files += [os.path.join(top, f) for f in fnames]
        self.serial = 0

    def step(self) -> str:
        rng, path = self.rng, self.rng.choice(self.files)
        kind = rng.choice(KINDS)
        names = [n for n in os.listxattr(path) if n.startswith("user.")]
        if kind in ("change", "remove") and not names:
            kind = "set"
        try:
            return self._do(kind, path, names)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.E2BIG):
                raise
            for name in names:  # the inode's xattr space is full (ext4: one block)
                os.removexattr(path, name)
            return "remove"

    def _do(self, kind: str, path: str, names: list[str]) -> str:
        rng = self.rng
        if kind == "set":
            self.serial += 1
            os.setxattr(path, f"user.new{os.getpid()}-{self.serial}", value(rng))
        elif kind == "change":
            os.setxattr(path, rng.choice(names), value(rng))
        elif kind == "remove":
            os.removexattr(path, rng.choice(names))
        elif kind == "rename":
            self.serial += 1
            new = os.path.join(rng.choice(self.dirs), f"moved{os.getpid()}-{self.serial}")
            os.setxattr(path, "user.moved", str(self.serial).encode())
            os.rename(path, new)
            self.files[self.files.index(path)] = new
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(b"more\n")
        else:
            d = rng.choice(self.dirs)
            if rng.random() < 0.3:
                names = [n for n in os.listxattr(d) if n.startswith("user.")]
                if names:
                    os.removexattr(d, rng.choice(names))
                    return kind
            os.setxattr(d, f"user.d{rng.randrange(4)}", value(rng))
        return kind


def main() -> None:
    a = writer_args().parse_args()
    rng = random.Random(a.seed)
    if a.populate:
        populate(a.root, a.populate, rng)
    else:
        tree = Tree(a.root, rng)
        run_at_rate(tree.step, a.status, a.rate)

if __name__ == "__main__":
    main()
