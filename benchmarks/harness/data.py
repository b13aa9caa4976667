"""The data files cases copy, each made once per run and shared by every case.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Callable

from harness import BenchError, KiB, MiB
from harness.procs import sync
from harness.stats import human_size


def stdlib_text() -> bytes:
    """All of the standard library's .py sources, concatenated in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "dist-packages" in f.parts:
            continue
        with contextlib.suppress(OSError):
            parts.append(f.read_bytes())
    text = b"".join(parts)
    if len(text) < MiB:
        raise BenchError(f"found only {len(text)} bytes of .py sources under {root}")
    return text


class Data:
    """Data files, each made once per run on first use, deleted by cleanup()."""

    def __init__(self, disk: Path, shm: Path, log: Callable[[str], None]) -> None:
        self.disk, self.shm, self.log = disk, shm, log
        self._made: dict[str, Path] = {}
        self._text: bytes | None = None

    def _once(self, key: str, path: Path, make: Callable[[Path], object]) -> Path:
        if key not in self._made:
            t = time.perf_counter()
            make(path)
            self._made[key] = path
            self.log(f"  made {path} ({human_size(path.stat().st_size)}) in "
                     f"{time.perf_counter() - t:.1f} s")
        return self._made[key]

    def random_disk(self, size: int) -> Path:
        """Random bytes on disk (written back, so later syncs have nothing of it left)."""
        def make(p: Path) -> None:
            with open(p, "wb") as f:
                left = size
                while left:
                    n = min(left, 4 * MiB)
                    f.write(os.urandom(n))
                    left -= n
            sync(p)
        return self._once(f"random-disk-{size}", self.disk / f"random-{size}.img", make)

    def copy_disk(self, name: str, size: int) -> Path:
        """A private copy of random_disk(size): for writers that change it."""
        src = self.random_disk(size)

        def make(p: Path) -> None:
            shutil.copyfile(src, p)
            sync(p)
        return self._once(f"{name}-{size}", self.disk / f"{name}-{size}.img", make)

    def changed_disk(self, size: int, fraction: float) -> Path:
        """random_disk(size) with `fraction` of its 4 KiB pages rewritten with new random bytes.

        The pages are a seeded random choice (the same in every run), written with pwrite
        in place; the file is written back before use.
        """
        src = self.random_disk(size)

        def make(p: Path) -> None:
            shutil.copyfile(src, p)
            pages = size // (4 * KiB)
            fd = os.open(p, os.O_WRONLY)
            try:
                for i in sorted(random.Random(2).sample(range(pages), int(pages * fraction))):
                    os.pwrite(fd, os.urandom(4 * KiB), i * 4 * KiB)
            finally:
                os.close(fd)
            sync(p)
        return self._once(f"changed-disk-{size}-{fraction}",
                          self.disk / f"changed-{size}.img", make)

    def random_shm(self, size: int) -> Path:
        src = self.random_disk(size)
        return self._once(f"random-shm-{size}", self.shm / f"random-{size}.img",
                          lambda p: shutil.copyfile(src, p))

    def mixed_shm(self, size: int) -> Path:
        """A quarter zero, a quarter random, half stdlib .py text, in shuffled 64 KiB chunks."""
        def make(p: Path) -> None:
            if self._text is None:
                self._text = stdlib_text()
            text, chunk = self._text, 64 * KiB
            n = size // chunk
            kinds = [0] * (n // 4) + [1] * (n // 4)
            kinds += [2] * (n - len(kinds))
            random.Random(1).shuffle(kinds)
            zero, pos = bytes(chunk), 0
            with open(p, "wb") as f:
                for k in kinds:
                    if k == 0:
                        f.write(zero)
                    elif k == 1:
                        f.write(os.urandom(chunk))
                    else:
                        piece = text[pos:pos + chunk]
                        if len(piece) < chunk:
                            piece += text[:chunk - len(piece)]
                        pos = (pos + chunk) % len(text)
                        f.write(piece)
                if size % chunk:
                    f.write(zero[:size % chunk])
        return self._once(f"mixed-shm-{size}", self.shm / f"mixed-{size}.img", make)
