"""A directory source's copy equals the tree, path by path (issue 12).

helpers/treekit.compare_trees is the referee, checked first against `cp -a` and against
one deliberate difference of each kind. Then: static trees with every kind of entry
(hard links, symlinks dangling or not, empty directories, a fifo, odd modes, a name that
is not UTF-8, as root a device node and foreign owners), and a live tree whose shape a
writer keeps changing, migrated with --pause-pid and compared at the pause instant (the
writer stays stopped: keep-paused is the default). The negative control
MULTIFD_TEST_STALE_TREE=1 skips the final rescan, so the same comparison must then find
the changes the copy missed.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers.mfdkit import Done, Kit
from helpers.treekit import (
    TreeWriter,
    assert_replica,
    compare_trees,
    ops_between,
    populate,
)

ROOT = os.geteuid() == 0
NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff\xfe.bin")
RUNS = 3


def build_static(src: Path) -> None:
    """A tree with one of everything a tree can hold that a copy must keep."""
    src.mkdir()
    (src / "plain.txt").write_bytes(b"hello\n" * 1000)
    (src / "empty").write_bytes(b"")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / NOT_UTF8).write_bytes(b"latin-1 name")
    for name, mode in (("ro", 0o444), ("secret", 0o600), ("none", 0o000), ("exec", 0o755)):
        (src / name).write_bytes(name.encode())
        os.chmod(src / name, mode)
    for name, mode in (("d700", 0o700), ("d750", 0o750), ("d2775", 0o2775)):
        (src / name).mkdir()
        os.chmod(src / name, mode)
    (src / "d750" / "inner").write_bytes(b"inside 0750")
    (src / "emptydir" / "nested" / "deeper").mkdir(parents=True)
    (src / "emptydir" / "alone").mkdir()
    # Hard links: three names in two directories, and a pair of its own.
    (src / "links").mkdir()
    (src / "links" / "a").write_bytes(b"one inode, three names")
    os.link(src / "links" / "a", src / "links" / "b")
    os.link(src / "links" / "a", src / "d700" / "c")
    (src / "pair1").write_bytes(b"two names")
    os.link(src / "pair1", src / "d750" / "pair2")
    # Symlinks: relative, absolute, to a directory, dangling, to themselves.
    os.symlink("plain.txt", src / "to-plain")
    os.symlink("links", src / "to-dir")
    os.symlink("does/not/exist", src / "dangling")
    os.symlink("/etc/hostname", src / "absolute")
    os.symlink("loop", src / "loop")
    os.mkfifo(src / "fifo", 0o640)
    if ROOT:
        os.mknod(src / "null-dev", stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.chown(src / "null-dev", 0, 5)
        os.chown(src / "secret", 65534, 65534)
        os.chown(src / "d750", 1234, 5678)
        (src / "suid").write_bytes(b"#!/bin/sh\n")
        os.chown(src / "suid", 65534, 65534)
        os.chmod(src / "suid", 0o4755)  # after chown, which clears it
        os.chown(src / "to-plain", 4321, 4321, follow_symlinks=False)
    # Directory mtimes last, from the bottom up, as a copy must set them.
    for i, (top, _, _) in enumerate(sorted(os.walk(src), key=lambda t: -len(t[0]))):
        os.utime(top, ns=(1_500_000_000_000_000_000 + i, 1_600_000_000_123_456_789 + i * 1000))


def migrate(kit: Kit, src: Path, dest: Path, *send_args: str,
            env: dict[str, str] | None = None) -> tuple[Done, Done]:
    r, uri = kit.recv(dest, timeout=60)
    s = kit.send(src, uri, *send_args, env=env, timeout=60)
    return s.wait(180), r.wait(60)


def tree_ok(send: Done, recv: Done) -> None:
    send.ok()
    recv.ok()
    passes = [e for e in send.events if e["event"] == "pass"]
    assert passes and all("entries" in p for p in passes), "not migrated as a tree"


# -- the referee ------------------------------------------------------------------------------------


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    a, b = tmp_path / "a", tmp_path / "b"
    build_static(a)
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    yield a, b


def test_referee_finds_cp_a_equal(twins: tuple[Path, Path]) -> None:
    assert compare_trees(*twins, owners=ROOT) == []


def _content_same_size(b: Path) -> None:
    st = (b / "plain.txt").stat()
    (b / "plain.txt").write_bytes(b"HELLO\n" * 1000)
    os.utime(b / "plain.txt", ns=(st.st_atime_ns, st.st_mtime_ns))


def _break_link(b: Path) -> None:
    st = (b / "links" / "b").stat()
    dmt = (b / "links").stat().st_mtime_ns
    os.unlink(b / "links" / "b")
    shutil.copy2(b / "links" / "a", b / "links" / "b")
    os.utime(b / "links", ns=(dmt, dmt))
    assert (b / "links" / "b").stat().st_mtime_ns == st.st_mtime_ns


def _fifo_to_file(b: Path) -> None:
    os.unlink(b / "fifo")
    (b / "fifo").write_bytes(b"")


def _retarget(b: Path) -> None:
    os.unlink(b / "dangling")
    os.symlink("does/not/exist2", b / "dangling")


MUTATIONS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "mode": (lambda b: os.chmod(b / "ro", 0o644), "'ro': mode"),
    "dir mode": (lambda b: os.chmod(b / "d750", 0o755), "'d750': mode"),
    "file mtime": (lambda b: os.utime(b / "empty", ns=(0, 1)), "'empty': mtime_ns"),
    "dir mtime": (lambda b: os.utime(b / "emptydir" / "alone", ns=(0, 1)),
                  "'emptydir/alone': mtime_ns"),
    "root mtime": (lambda b: os.utime(b, ns=(0, 1)), "'.': mtime_ns"),
    "content": (_content_same_size, "'plain.txt': sha"),
    "hard link": (_break_link, "hard-link group"),
    "symlink": (_retarget, "'dangling': target"),
    "type": (_fifo_to_file, "'fifo': type"),
    "extra": (lambda b: (b / "emptydir" / "new").mkdir(), "'emptydir/new': only in"),
    "missing": (lambda b: os.rmdir(b / "emptydir" / "alone"), "'emptydir/alone': only in"),
    "not utf-8": (lambda b: os.chmod(b / NOT_UTF8, 0o600), repr(NOT_UTF8)),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_referee_reports_each_difference(twins: tuple[Path, Path], what: str) -> None:
    a, b = twins
    mutate, expected = MUTATIONS[what]
    mutate(b)
    diffs = compare_trees(a, b, owners=ROOT)
    assert diffs and any(expected in d for d in diffs), diffs


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_referee_compares_owners_only_when_asked(twins: tuple[Path, Path]) -> None:
    a, b = twins
    os.chown(b / "plain.txt", 65534, 0)
    assert compare_trees(a, b, owners=False) == []
    assert any("'plain.txt': uid" in d for d in compare_trees(a, b, owners=True))


# -- static trees ------------------------------------------------------------------------------------


def test_static_tree_with_every_kind_of_entry(tmp_path: Path, kit: Kit) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    build_static(src)
    tree_ok(*migrate(kit, src, dest))
    assert_replica(src, dest, owners=ROOT)


def test_a_socket_is_skipped_with_one_warning(tmp_path: Path, kit: Kit,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "data").write_bytes(b"kept")
    monkeypatch.chdir(src)  # sun_path is short; bind by relative name
    with socket.socket(socket.AF_UNIX) as sk:
        sk.bind("app.sock")
        os.utime(src, ns=(1, 1_700_000_000_000_000_000))
        send, recv = migrate(kit, src, dest)
        tree_ok(send, recv)
    assert sorted(os.listdir(dest)) == ["data"]
    warned = [ln for ln in (send.err + recv.err).splitlines() if "app.sock" in ln]
    assert len(warned) == 1, send.err + recv.err
    diffs = compare_trees(src, dest, owners=ROOT)
    assert diffs == ["'app.sock': only in " f"{src} (socket)"], diffs


# -- a live tree that changes shape ------------------------------------------------------------------


@pytest.fixture
def tree_writers() -> Iterator[list[TreeWriter]]:
    started: list[TreeWriter] = []
    yield started
    for w in started:
        w.kill()


def live_migration(tmp_path: Path, kit: Kit, tree_writers: list[TreeWriter], seed: int,
                   rate: int, env: dict[str, str] | None = None, only: tuple[str, ...] = ()
                   ) -> tuple[Path, Path, Done, dict[str, int]]:
    src, dest = tmp_path / "src", tmp_path / "dest"
    populate(src, 400, seed)
    w = TreeWriter(src, tmp_path / "counts", rate=rate, seed=seed, files=400, only=only)
    tree_writers.append(w)
    before = w.counts()
    send, recv = migrate(kit, src, dest, "--pause-pid", str(w.pid), env=env)
    tree_ok(send, recv)
    assert w.stopped(), "keep-paused is the default: the writer must still be stopped"
    return src, dest, send, ops_between(before, w.counts())


@pytest.mark.parametrize("run", range(RUNS))
def test_live_tree_equals_the_source_at_the_pause(tmp_path: Path, kit: Kit,
                                                   tree_writers: list[TreeWriter],
                                                   run: int) -> None:
    src, dest, send, ops = live_migration(tmp_path, kit, tree_writers, seed=run + 1, rate=500)
    # The shape really changed while the migration ran, in every way a service changes it.
    for kind in ("create", "append", "save", "rename", "link", "symlink", "unlink", "mkdir"):
        assert ops[kind] > 0, f"no {kind} during the migration: {ops}"
    passes = [e for e in send.events if e["event"] == "pass"]
    assert len(passes) >= 2, passes
    assert sum(p["tree_ops"] for p in passes[1:]) > 0, "later passes sent no tree changes"
    assert_replica(src, dest, owners=ROOT)


def test_live_tree_whose_directories_move(tmp_path: Path, kit: Kit,
                                         tree_writers: list[TreeWriter]) -> None:
    """Only directory renames (and appends): a file that moves with its directory
    keeps its inode, size, mtime and ctime, so nothing but the move itself says it
    still has to be read if a pass missed it at its old path."""
    src, dest, _, ops = live_migration(tmp_path, kit, tree_writers, seed=11, rate=200,
                                       only=("rename_dir", "append"))
    assert ops["rename_dir"] > 0 and ops["append"] > 0, ops
    assert_replica(src, dest, owners=ROOT)


def test_a_directory_renamed_while_a_pass_reads_it(tmp_path: Path, kit: Kit,
                                                   sleeper: int) -> None:
    """The same, made deterministic: pass 1, capped to 2 MiB/s, is still reading a/
    (1500 files, 6 MiB) when a/ becomes b/. The files it had not read yet are no longer
    at their path; nothing about them changes later (a directory's rename leaves its
    files' ctime alone), yet their content must still reach the copy."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "a").mkdir(parents=True)
    for i in range(1500):
        (src / "a" / f"f{i:04}").write_bytes(os.urandom(4096))
    r, uri = kit.recv(dest, timeout=60)
    s = kit.send(src, uri, "--pause-pid", str(sleeper), "--max-bandwidth", "2M",
                 "--json-interval", "0.1", timeout=60)
    s.wait_for(lambda e: e["event"] == "progress" and e.get("pass") == 1, 30, "pass 1 under way")
    time.sleep(1.0)  # of the 3 s pass 1 takes
    os.rename(src / "a", src / "b")
    early = [e for e in s.events if e["event"] == "pass"]
    send, recv = s.wait(120), r.wait(60)
    assert early == [], "pass 1 had ended before the rename: the case did not happen"
    tree_ok(send, recv)
    assert_replica(src, dest, owners=ROOT)


def test_stale_tree_negative_control(tmp_path: Path, kit: Kit,
                                     tree_writers: list[TreeWriter]) -> None:
    """Without the final rescan the copy misses the last changes, though multifd's own
    verification passes: the referee above must see it."""
    # Only changes that add: a stale final pass then reads no path that has gone (which
    # send would notice, exit 7), and the copy silently lacks what came last.
    kinds = ("create", "append", "mkdir", "chmod", "symlink", "link")
    src, dest, _, ops = live_migration(tmp_path, kit, tree_writers, seed=99, rate=400,
                                       env={"MULTIFD_TEST_STALE_TREE": "1"}, only=kinds)
    assert ops["create"] > 0 and ops["append"] > 0, ops
    assert compare_trees(src, dest, owners=ROOT) != []
