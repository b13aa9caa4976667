"""tree-static and tree-scan: a tree of many small files at rest.

tree-static copies it to a new tree on disk with multifd, with `rsync -a` through a
loopback rsync daemon and with `tar | socat`, the baselines followed by `sync -f` since
multifd fsyncs. tree-scan times a pass over the unchanged tree. Both also give the
memory per file of multifd's main processes.

The tree: MULTIFD_BENCH_TREE_FILES files (100,000; 10,000 with --quick) of 1 KiB to
MULTIFD_BENCH_TREE_MAX_KIB (64) random bytes each, 100 to a directory, 32 directories
to a group. About 3 GiB at the full size, which is the real case.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from harness import INSTALL_HINT, REST_S, BenchError, KiB, MiB, Sample
from harness.procs import CHILD, Proc, free_port, timed, wait_listening
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import completed_pair, interleave
from harness.stats import human_size, med, ratio, secs, spread

from cases.peers import rsync_daemon

FILES_ENV = "MULTIFD_BENCH_TREE_FILES"
MAX_KIB_ENV = "MULTIFD_BENCH_TREE_MAX_KIB"
PER_DIR = 100
DIRS_PER_GROUP = 32
#: Whole-second mtimes an hour back: tar's default format keeps seconds only, and a tree
#: at rest is what this case measures.
MTIME_S = int(time.time()) - 3600


# -- the tree ---------------------------------------------------------------------------------


def tree_files(ctx: Ctx) -> int:
    """The file count: the env setting, else 100,000 (10,000 with --quick)."""
    text = os.environ.get(FILES_ENV, "")
    return int(text) if text.strip() else (10_000 if ctx.quick else 100_000)


def max_bytes() -> int:
    text = os.environ.get(MAX_KIB_ENV, "")
    return (int(text) if text.strip() else 64) * KiB


def make_tree(root: Path, files: int, hi: int, seed: int = 7) -> dict[str, int]:
    """Write FILES files of 1 KiB..HI random bytes under ROOT; returns counts.

    Content comes from one 64 MiB random pool at random offsets, so files differ and
    do not compress, without paying for os.urandom on 3 GiB.
    """
    rnd = random.Random(seed)
    pool = memoryview(os.urandom(64 * MiB))
    total = pages = 0
    dirs: list[Path] = [root]
    root.mkdir()
    for i in range(files):
        if i % PER_DIR == 0:
            d = i // PER_DIR
            group = root / f"g{d // DIRS_PER_GROUP:03d}"
            if d % DIRS_PER_GROUP == 0:
                group.mkdir()
                dirs.append(group)
            cur = group / f"d{d:05d}"
            cur.mkdir()
            dirs.append(cur)
        size = rnd.randint(KiB, hi)
        off = rnd.randrange(0, len(pool) - size)
        path = cur / f"f{i:07d}.dat"
        with open(path, "wb") as f:
            f.write(pool[off:off + size])
        os.utime(path, ns=(MTIME_S * 10**9, MTIME_S * 10**9))
        total += size
        pages += -(-size // (4 * KiB))
    for dpath in reversed(dirs):  # children first: setting a child's mtime touches no parent
        os.utime(dpath, ns=(MTIME_S * 10**9, MTIME_S * 10**9))
    return {"files": files, "dirs": len(dirs), "bytes": total, "pages": pages}


_TREES: dict[tuple[Path, int, int], tuple[Path, dict[str, int], float]] = {}


def static_tree(ctx: Ctx, files: int) -> tuple[Path, dict[str, int]]:
    """The run's shared tree at rest (made once, written back), and its counts."""
    key = (ctx.disk, files, max_bytes())
    if key not in _TREES:
        root = ctx.disk / f"tree-{files}"
        t = time.perf_counter()
        info = make_tree(root, files, max_bytes())
        subprocess.run(["sync", "-f", str(root)], check=True)
        ctx.log(f"  made {root}: {info['files']} files, {human_size(info['bytes'])} in "
                f"{time.perf_counter() - t:.0f} s")
        _TREES[key] = (root, info, time.time())
    root, info, made = _TREES[key]
    time.sleep(max(0.0, made + REST_S - time.time()))  # every ctime older than the shortcut's 2 s
    return root, info


def remove_tree(path: Path) -> None:
    """Remove a copy (untimed) and write the removal back, so it does not load a timed run."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)
        subprocess.run(["sync", "-f", str(path.parent)], check=True)


def _entries(root: Path) -> dict[str, tuple[Any, ...]]:
    """Path -> (type, mode, size, mtime_ns, uid, gid, target) for every entry below root."""
    out: dict[str, tuple[Any, ...]] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                rel = os.path.relpath(e.path, root)
                target = os.readlink(e.path) if stat.S_ISLNK(st.st_mode) else ""
                size = st.st_size if stat.S_ISREG(st.st_mode) or target else 0
                out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size,
                            st.st_mtime_ns if not target else 0, st.st_uid, st.st_gid, target,
                            (st.st_dev, st.st_ino) if st.st_nlink > 1 and not e.is_dir() else None)
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
    st = root.stat()
    out["."] = (stat.S_IFDIR, stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, st.st_uid, st.st_gid,
                "", None)
    return out


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def tree_differences(src: Path, dst: Path, limit: int = 5) -> list[str]:
    """Where DST is not a replica of SRC: path, type, mode, size, mtime, owner, symlink
    target, content and hard-link groups, path by path. Empty when equal."""
    a, b = _entries(src), _entries(dst)
    bad = [f"{p}: missing in the copy" for p in sorted(a.keys() - b.keys())[:limit]]
    bad += [f"{p}: not in the source" for p in sorted(b.keys() - a.keys())[:limit]]
    names = ("type", "mode", "size", "mtime_ns", "uid", "gid", "target")
    links_a: dict[Any, set[str]] = {}
    links_b: dict[Any, set[str]] = {}
    for p in sorted(a.keys() & b.keys()):
        x, y = a[p], b[p]
        for n, u, v in zip(names, x, y):
            if u != v:
                bad.append(f"{p}: {n} {u} in the source, {v} in the copy")
        if x[7] is not None:
            links_a.setdefault(x[7], set()).add(p)
        if y[7] is not None:
            links_b.setdefault(y[7], set()).add(p)
        if (x[0] == stat.S_IFREG == y[0] and x[2] == y[2] and len(bad) < limit
                and not _same_content(str(src / p), str(dst / p))):
            bad.append(f"{p}: content differs")
        if len(bad) >= limit:
            return bad
    ga = sorted(sorted(g) for g in links_a.values())
    gb = sorted(sorted(g) for g in links_b.values())
    if ga != gb:
        bad.append(f"hard-link groups differ: {ga[:3]} in the source, {gb[:3]} in the copy")
    return bad[:limit]


# -- multifd on a tree --------------------------------------------------------------------------


def _hwm_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]
    return []


class HwmWatch:
    """Peak RSS (VmHWM) of some main processes and, separately, of their children,
    polled until they exit. VmHWM only grows, so the last reading before exit is the
    peak unless the process grew in its last poll interval."""

    def __init__(self, pids: dict[str, int], every: float = 0.05) -> None:
        self.pids, self.every = pids, every
        self.main = dict.fromkeys(pids, 0)
        self.child = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for role, pid in self.pids.items():
                self.main[role] = max(self.main[role], _hwm_kb(pid))
                for c in _children(pid):
                    self.child[role] = max(self.child[role], _hwm_kb(c))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def child_env(extra: dict[str, str]) -> Iterator[None]:
    """Children started inside get EXTRA in their environment (test-only switches)."""
    saved = dict(CHILD.env)
    CHILD.env.update(extra)
    try:
        yield
    finally:
        CHILD.env.clear()
        CHILD.env.update(saved)


def tree_migrate(src: Path, dst: Path, *, channels: int = 2, extra: Sequence[str] = (),
                 timeout: float = 1800) -> Sample:
    """One multifd migration of the directory SRC to a new DST on disk.

    Timed from starting send (recv listening) to send's exit, which follows recv's
    verification, fsync and rename into place. Peak RSS comes from VmHWM of send's and
    recv's main processes (the pids started here: no GNU time wrapper) and of their
    channel processes.
    """
    remove_tree(dst)
    recv = Proc([*CHILD.multifd, "recv", "--json", "--log-level", "warning", str(dst)])
    watch: HwmWatch | None = None
    try:
        uri = json.loads(recv.first_line())["uri"]
        t0 = time.perf_counter()
        send = Proc([*CHILD.multifd, "send", str(src), "--to", uri, "--json", "--log-level",
                     "warning", "--channels", str(channels), *extra], t0=t0)
        watch = HwmWatch({"send": send.pid, "recv": recv.pid})
        try:
            wall = send.wait(timeout)
        except BenchError:
            recv.kill()
            raise
        recv.t0 = t0
        recv_wall = recv.wait(120)
    finally:
        if watch is not None:
            watch.stop()
        recv.kill()
    sev = send.events()
    s, _ = completed_pair(send, recv)
    if not dst.is_dir():
        raise BenchError(f"{dst} is not a directory after completion")
    sw = [e for e in sev if e.get("event") == "switchover"]
    final = [e for e in sev if e.get("event") == "pass" and e.get("final")]
    # Of the downtime, what follows the final pass: recv's verification and fsyncs.
    after_final = (s["ts"] - final[-1]["ts"]) * 1000 if final and "ts" in s else None
    keys = ("pass", "entries", "tree_ops", "files_read", "dirty_bytes", "sent_bytes",
            "duration_ms", "expected_downtime_ms", "final", "read_bytes", "tracker")
    return {
        "s": wall, "recv_s": recv_wall, "total_time_ms": s.get("total_time_ms"),
        "downtime_ms": s.get("downtime_ms"), "passes": s.get("passes"),
        "paused": s.get("paused"), "transferred_bytes": s.get("transferred_bytes"),
        "expected_downtime_ms": sw[-1].get("expected_downtime_ms") if sw else None,
        "after_final_pass_ms": after_final,
        "send_hwm_kb": watch.main["send"], "recv_hwm_kb": watch.main["recv"],
        "send_channel_hwm_kb": watch.child["send"], "recv_channel_hwm_kb": watch.child["recv"],
        "pass_events": [{k: e.get(k) for k in keys}
                        for e in sev if e.get("event") == "pass"],
    }


def probe_tree_support(work: Path) -> tuple[Sample | None, str]:
    """Migrate a 10-file tree once (untimed): the memory baseline, or why multifd cannot."""
    src, dst = work / "tree-probe.src", work / "tree-probe.dst"
    shutil.rmtree(src, ignore_errors=True)
    make_tree(src, 10, 4 * KiB, seed=1)
    time.sleep(REST_S)
    try:
        return tree_migrate(src, dst), ""
    except BenchError as e:
        return None, str(e)
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


# -- baselines ---------------------------------------------------------------------------------


def rsync_tree(src: Path, dst: Path, port: int) -> Sample:
    """`rsync -a SRC/ rsync://127.0.0.1:PORT/bench/NAME/` then `sync -f DST`, both timed."""
    remove_tree(dst)
    marks = timed([["rsync", "-a", f"{src}/", f"rsync://127.0.0.1:{port}/bench/{dst.name}/"],
                   ["sync", "-f", str(dst)]], timeout=3600)
    return {"s": marks[-1], "copy_s": marks[0], "sync_s": marks[1] - marks[0]}


def tar_socat_tree(src: Path, dst: Path) -> Sample:
    """`tar -cf - . | socat` into `socat | tar -xf -`, then `sync -f DST`: all timed."""
    remove_tree(dst)
    dst.mkdir()
    port, q = free_port(), shlex.quote
    recv = Proc([f"socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 - | tar -C {q(str(dst))} "
                 "-xf -"], shell=True)
    try:
        wait_listening(port)
        t0 = time.perf_counter()
        Proc([f"tar -C {q(str(src))} -cf - . | socat -u - TCP:127.0.0.1:{port}"], t0=t0,
             shell=True).wait(3600)
        recv.t0 = t0
        copy = recv.wait(120)
    finally:
        recv.kill()
    total = timed([["sync", "-f", str(dst)]])[0] + copy
    return {"s": total, "copy_s": copy, "sync_s": total - copy}


def checked_once(name: str, src: Path, dst: Path, run: Callable[[], Sample],
                 seen: set[str]) -> Callable[[], Sample]:
    """RUN, whose first copy is compared with SRC path by path (untimed)."""
    def go() -> Sample:
        sample = run()
        if name not in seen:
            bad = tree_differences(src, dst)
            if bad:
                raise BenchError(f"{name}: the copy is not a replica: {'; '.join(bad)}")
            seen.add(name)
        return sample
    return go


# -- the cases ----------------------------------------------------------------------------------


def per_file_bytes(big: Sample, base: Sample | None, files: int, key: str) -> float | None:
    """(peak RSS of the big run - peak RSS of the 10-file probe) / files, in bytes."""
    if base is None or not big.get(key) or not base.get(key):
        return None
    return float(big[key] - base[key]) * 1024 / files


def memory_rows(runs: list[Sample], base: Sample | None, files: int,
                info: dict[str, int]) -> list[list[str]]:
    rows = []
    for side in ("send", "recv"):
        key = f"{side}_hwm_kb"
        per = [x for x in (per_file_bytes(r, base, files, key) for r in runs) if x is not None]
        rows.append([f"{side} main", f"{max(r[key] for r in runs) / 1024:.0f}",
                     f"{base[key] / 1024:.0f}" if base else "-",
                     spread(per, 0) if per else "-",
                     f"{max(r[f'{side}_channel_hwm_kb'] for r in runs) / 1024:.0f}"])
    rows.append(["(for scale)", "-", "-", f"{info['pages'] * 8 / files:.0f} = 8 B × "
                 f"{info['pages'] / files:.1f} pages/file", "-"])
    return rows


def case_tree_static(ctx: Ctx, res: CaseResult) -> None:
    """multifd vs rsync daemon + sync vs tar | socat + sync, a tree of small files on disk."""
    files = tree_files(ctx)
    have = {t: shutil.which(t) is not None for t in ("rsync", "socat", "tar")}
    res.title = f"tree-static: {files} small files at rest to a new tree on disk"
    res.setup = (f"{files} files of 1 KiB–{max_bytes() // KiB} KiB random bytes, {PER_DIR} to a "
                 "directory, source and copies on disk, source in the page cache. multifd: "
                 "send DIR --to tcp (2 channels) into recv DEST, timed from starting send to "
                 "its exit (recv fsyncs every file and renames the tree into place). rsync: `rsync "
                 "-a SRC/ rsync://127.0.0.1:PORT/bench/DST/` to a loopback daemon, then `sync -f "
                 "DST`. tar: `tar -C SRC -cf - . | socat -u - TCP:…` into `socat -u TCP-LISTEN:… "
                 "- | tar -C DST -xf -`, then `sync -f DST`. All timed to the end of the sync. "
                 "The previous copy is removed and written back (untimed) before every run; "
                 "each variant's first copy is compared path by path with the source (untimed). "
                 f"Count: {FILES_ENV} (100000; --quick 10000); size: {MAX_KIB_ENV}. Memory per "
                 "file: peak RSS (VmHWM) of the main process over this run minus over a 10-file "
                 "tree, divided by the files.")
    src, info = static_tree(ctx, files)
    base, why = probe_tree_support(ctx.disk)
    seen: set[str] = set()
    variants: dict[str, Callable[[], Sample]] = {}
    dsts = [ctx.disk / "tree-static.multifd", ctx.disk / "tree-static.tar"]
    if base is not None:
        variants["multifd"] = checked_once("multifd", src, dsts[0],
                                           lambda: tree_migrate(src, dsts[0]), seen)
    missing = [t for t, ok in have.items() if not ok]
    with contextlib.ExitStack() as stack:
        if have["rsync"]:
            rroot = ctx.disk / "tree-rsync-root"
            rroot.mkdir(exist_ok=True)
            port = stack.enter_context(rsync_daemon(rroot, ctx.disk))
            rdst = rroot / "dst"
            dsts.append(rdst)
            variants["rsync -a (daemon) + sync"] = checked_once(
                "rsync", src, rdst, lambda: rsync_tree(src, rdst, port), seen)
        if have["socat"] and have["tar"]:
            variants["tar | socat + sync"] = checked_once(
                "tar", src, dsts[1], lambda: tar_socat_tree(src, dsts[1]), seen)
        runs = interleave(variants, ctx.pairs, ctx.log) if variants else {}
    for d in dsts:
        shutil.rmtree(d, ignore_errors=True)
    mb = info["bytes"] / 1e6
    rows = []
    for v, xs in runs.items():
        detail = (f"copy {spread(secs(xs, 'copy_s'))} s + sync {spread(secs(xs, 'sync_s'))} s"
                  if "copy_s" in xs[0] else
                  f"passes {spread(secs(xs, 'passes'), 0)}; recv exits at "
                  f"{spread(secs(xs, 'recv_s'))} s")
        rows.append([v, spread(secs(xs)), f"{files / med(secs(xs)):.0f}",
                     f"{mb / med(secs(xs)):.0f}", detail])
    rows += [[t, f"not installed: `{INSTALL_HINT}`", "-", "-", "-"] for t in missing]
    res.tables.append(md_table(["variant", "wall s median (min–max)", "files/s", "MB/s",
                                "detail"], rows))
    rrows = []
    for peer in [v for v in runs if v != "multifd"]:
        if "multifd" not in runs:
            break
        rt = ratio(secs(runs["multifd"]), secs(runs[peer]))
        goal = "rsync" in peer
        rrows.append([f"multifd / {peer}", rt.text(), f"{rt.below}/{len(rt.ratios)} rounds",
                      "≤ 0.5: " + verdict(rt.median <= 0.5) if goal else "context"])
        res.summary.append([f"multifd / {peer}, wall", rt.text(), "≤ 0.5" if goal else "-",
                            verdict(rt.median <= 0.5) if goal else "context"])
    if rrows:
        res.tables.append(md_table(["ratio", "median of per-round ratios (min–max)",
                                    "multifd faster in", "target"], rrows))
    if "multifd" in runs:
        m = runs["multifd"]
        res.tables.append(md_table(
            ["process", "peak RSS MiB, this tree", "10-file tree", "bytes per file",
             "largest channel MiB"], memory_rows(m, base, files, info)))
        for side in ("send", "recv"):
            per = [x for x in (per_file_bytes(r, base, files, f"{side}_hwm_kb") for r in m)
                   if x is not None]
            if per:
                res.summary.append([f"{side} main, bytes per file (peak RSS)", spread(per, 0),
                                    "≈ 200 + page tables", "context"])
        quiet = [p["entries"] / p["duration_ms"] * 1000 for r in m for p in r["pass_events"]
                 if p["pass"] > 1 and not p["files_read"] and not p["tree_ops"]
                 and p["duration_ms"]]
        if quiet:
            res.summary.append(["send's pass over the unchanged tree, entries/s (pass event)",
                                spread(quiet, 0), "≥ 50,000", verdict(med(quiet) >= 50_000)])
        res.tables.append(md_table(
            ["pass", "entries", "tree_ops", "files_read", "duration_ms", "final"],
            [[p["pass"], p["entries"], p["tree_ops"], p["files_read"], p["duration_ms"],
              p["final"]] for p in m[0]["pass_events"]]))
    else:
        res.error = f"multifd cannot migrate a directory in this build: {why}"
        res.summary.append(["multifd", "not run", "-", why.rsplit(" exited ", 1)[-1][:160]])
    for v, xs in runs.items():
        if v != "multifd":
            res.summary.append([f"{v}, wall s", spread(secs(xs)), "-", "context"])
    res.raw = {"tree": info, "runs": runs, "probe": base}
    with contextlib.suppress(OSError):
        (ctx.disk / "tree-rsync-root").rmdir()


SCAN_CODE = r"""
import json, os, sys, time, tracemalloc
mode, root = sys.argv[1], sys.argv[2]
if mode == "ref":
    t = time.perf_counter()
    n, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    print(json.dumps({"entries": n, "scan_s": time.perf_counter() - t}))
    sys.exit()
from multifd_cli.send.tree.diff import TreeTracker
from multifd_cli.send.tree.scan import scan_tree
tracker = TreeTracker()
tracker.advance(scan_tree(root))
t = time.perf_counter()
snap = scan_tree(root)
t1 = time.perf_counter()
delta = tracker.advance(snap)
reads = sum(1 for _ in delta.scan())
ops = sum(1 for _ in delta.ops()) + sum(1 for _ in delta.times())
t2 = time.perf_counter()
tracemalloc.start()
again = scan_tree(root)
traced = tracemalloc.get_traced_memory()[0]
tracemalloc.stop()
print(json.dumps({"entries": len(snap), "scan_s": t1 - t, "diff_s": t2 - t1, "reads": reads,
                  "ops": ops, "array_bytes": snap.nbytes(), "traced_bytes": traced}))
"""


def scan_once(mode: str, root: Path) -> Sample:
    p = Proc([*CHILD.multifd[:1], "-c", SCAN_CODE, mode, str(root)])
    wall = p.wait(600)
    out: Sample = json.loads(p.lines[-1])
    out["wall_s"] = wall
    out["s"] = out["scan_s"] + out.get("diff_s", 0.0)
    out["rate"] = out["entries"] / out["s"]
    if mode == "multifd" and (out["reads"] or out["ops"]):
        raise BenchError(f"the unchanged pass found {out['reads']} files to read and "
                         f"{out['ops']} tree ops")
    return out


def case_tree_scan(ctx: Ctx, res: CaseResult) -> None:
    """A pass over the unchanged tree: scan_tree + TreeTracker.advance, in files per second."""
    files = tree_files(ctx)
    src, info = static_tree(ctx, files)
    n = info["files"] + info["dirs"]
    res.title = f"tree-scan: a pass over the unchanged tree of {files} files"
    res.setup = ("In a fresh process running the measured code: one scan_tree + "
                 "TreeTracker.advance as pass 1, then the timed unchanged pass: scan_tree "
                 "(scandir + lstat of every entry) and advance (the diff against pass 1), which "
                 "must find no file to read and no tree op. Rate = entries / (scan + diff). "
                 "Reference, interleaved: the same walk as plain scandir + lstat in Python, no "
                 "snapshot kept. Memory: bytes per entry of the snapshot's arrays, and what "
                 "tracemalloc counts as held by one snapshot. The inode cache is warm.")
    runs = interleave({"multifd unchanged pass": lambda: scan_once("multifd", src),
                       "reference walk": lambda: scan_once("ref", src)}, ctx.pairs, ctx.log)
    m, r = runs["multifd unchanged pass"], runs["reference walk"]
    rate, rrate = secs(m, "rate"), secs(r, "rate")
    rt = ratio(rate, rrate)
    res.tables.append(md_table(
        ["variant", "entries/s median (min–max)", "s median", "detail"],
        [["multifd scan_tree + advance", spread(rate, 0), spread(secs(m)),
          f"scan {spread(secs(m, 'scan_s'))} s + diff {spread(secs(m, 'diff_s'))} s; "
          f"{m[0]['entries']} entries"],
         ["reference: scandir + lstat", spread(rrate, 0), spread(secs(r)), "-"]]))
    ok = med(rate) >= 50_000
    res.tables.append(md_table(
        ["metric", "median (min–max)", "target"],
        [["rate / reference rate", rt.text(), "context"],
         ["entries/s", spread(rate, 0), "≥ 50,000: " + verdict(
             ok, f"{sum(x >= 50_000 for x in rate)}/{len(rate)} runs")],
         ["snapshot arrays, bytes per entry", f"{m[0]['array_bytes'] / n:.0f}", "context"],
         ["snapshot under tracemalloc, bytes per entry", f"{m[0]['traced_bytes'] / n:.0f}",
          "≈ 200"]]))
    res.summary += [["unchanged pass, entries/s", spread(rate, 0), "≥ 50,000", verdict(ok)],
                    ["snapshot, bytes per entry (tracemalloc)",
                     f"{m[0]['traced_bytes'] / n:.0f}", "≈ 200", "context"]]
    res.raw = {"tree": info, "runs": runs, "ratio": rt.as_json(), "python": sys.version}
