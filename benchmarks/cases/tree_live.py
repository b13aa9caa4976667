"""tree-live: a tree of 10,000 files whose shape a writer keeps changing, migrated
with --pause-pid; downtime, expected downtime, passes, and whether the copy equals the
tree at the pause.

The writer (WRITER_CODE, run as its own process) does 200 operations per second, each
a create, an append, a rename (one in four over an existing file, as an atomic save
does) or a delete, and rewrites random 4 KiB pages of its files at 16 MiB/s. send
leaves it paused after success (the default --after-success keep-paused), so the
source still is the tree at the pause when it is compared with the copy, path by path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from harness import REST_S, BenchError, KiB, MiB, Sample
from harness.procs import CHILD, Proc
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave
from harness.stats import med, ratio, secs, spread

from cases.tree_static import (
    child_env,
    make_tree,
    probe_tree_support,
    tree_differences,
    tree_migrate,
)

FILES_ENV = "MULTIFD_BENCH_TREE_LIVE_FILES"
OPS_PER_S = 200
PAGE_BYTES_PER_S = 16 * MiB
LIMIT_MS = 300

WRITER_CODE = r"""
import json, os, random, sys, time
root, ops_rate, byte_rate, seed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
pool = os.urandom(16 << 20)
dirs, files = [], []
for d, _, names in os.walk(root):
    dirs.append(d)
    files += [os.path.join(d, n) for n in names]
count = {"create": 0, "append": 0, "rename": 0, "save": 0, "delete": 0, "pages": 0}
serial = 0

def chunk(n):
    off = rnd.randrange(0, len(pool) - n)
    return pool[off:off + n]

def fresh():
    global serial
    serial += 1
    return os.path.join(rnd.choice(dirs), f"w{seed}-{serial}.dat")

def pick():
    return rnd.randrange(len(files))

def one_op():
    kind = rnd.choice(("create", "append", "rename", "delete"))
    if kind == "create" or len(files) < 100:
        p = fresh()
        with open(p, "wb") as f:
            f.write(chunk(rnd.randint(1024, 65536)))
        files.append(p)
        kind = "create"
    elif kind == "append":
        with open(files[pick()], "ab") as f:
            f.write(chunk(rnd.randint(1, 16384)))
    elif kind == "rename":
        i = pick()
        if rnd.random() < 0.25:  # over another file: that name now holds a new inode
            j = pick()
            if j != i:
                os.rename(files[i], files[j])
                files[i] = files[-1]
                files.pop()
                count["save"] += 1
                return
        p = fresh()
        os.rename(files[i], p)
        files[i] = p
    else:
        i = pick()
        os.unlink(files[i])
        files[i] = files[-1]
        files.pop()
    count[kind] += 1

def one_page():
    p = files[pick()]
    size = os.path.getsize(p)
    n = min(4096, size)
    off = rnd.randrange(max(1, size // 4096)) * 4096 if size >= 4096 else 0
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, chunk(n), off)
    finally:
        os.close(fd)
    count["pages"] += 1
    return n

print("ready", flush=True)
t0 = last = time.monotonic()
ops_mark = byte_mark = 0.0  # work due so far; a stall leaves at most one second owed
ops_done = bytes_done = 0
while True:
    now = time.monotonic()
    ops_mark = max(ops_mark, ops_rate * (now - t0 - 1))
    byte_mark = max(byte_mark, byte_rate * (now - t0 - 1))
    while ops_mark < ops_rate * (now - t0):
        one_op()
        ops_mark += 1
        ops_done += 1
    while byte_mark < byte_rate * (now - t0):
        n = one_page()
        byte_mark += n
        bytes_done += n
    if now - last >= 1:
        last = now
        print(json.dumps({"elapsed_s": now - t0, "ops": ops_done, "bytes": bytes_done, **count,
                          "files": len(files)}), flush=True)
    time.sleep(0.005)
"""


def live_files(ctx: Ctx) -> int:
    text = os.environ.get(FILES_ENV, "")
    return int(text) if text.strip() else 10_000


def process_state(pid: int) -> str:
    """The state letter of a process (T: stopped), '' once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def live_run(src: Path, dst: Path, seed: int, env: dict[str, str] | None = None) -> Sample:
    """One migration of SRC with the writer running; the copy is compared with the
    paused source afterwards (untimed), and the result says how."""
    w = Proc([*CHILD.multifd[:1], "-c", WRITER_CODE, str(src), str(OPS_PER_S),
              str(PAGE_BYTES_PER_S), str(seed)])
    try:
        if w.first_line().strip() != "ready":
            raise BenchError(f"writer: {w.stderr_tail()}")
        time.sleep(1.5)
        if not w.running:
            raise BenchError(f"writer died: {w.stderr_tail()}")
        with child_env(env or {}):
            s = tree_migrate(src, dst, extra=["--pause-pid", str(w.pid),
                                              "--downtime-limit", str(LIMIT_MS)])
        state = process_state(w.pid)
        if state != "T":
            raise BenchError(f"the writer is not paused after send exited (state {state!r})")
        if not s["paused"]:
            raise BenchError("send completed without pausing the writer")
        s["differences"] = tree_differences(src, dst)
        stats = [json.loads(x) for x in w.lines[1:] if x.startswith("{")]
        s["writer"] = stats[-1] if stats else {}
    finally:
        w.signal(signal.SIGCONT)
        w.kill()
    if not s["writer"]:
        raise BenchError("the writer reported nothing before the pause")
    return s


def stale_control(src: Path, dst: Path, seed: int) -> Sample:
    """The negative control: a live run whose final pass reuses the previous walk. It must
    not pass unnoticed: either send itself finds the stale walk (a file it was told to read
    is gone: exit 7, nothing at DEST) or the comparison finds the copy different."""
    try:
        return live_run(src, dst, seed, {"MULTIFD_TEST_STALE_TREE": "1"})
    except BenchError as e:
        if " exited 7: " not in str(e):
            raise
        if dst.exists():
            raise BenchError(f"send failed with exit 7 but left {dst}") from None
        msg = str(e).split(" exited 7: ", 1)[1]
        return {"differences": [f"send exit 7 (nothing at DEST): {msg}"]}


def case_tree_live(ctx: Ctx, res: CaseResult) -> None:
    """Live tree with --pause-pid vs a static multifd copy of the same tree, interleaved."""
    files = live_files(ctx)
    res.title = (f"tree-live: {files} files, a writer doing {OPS_PER_S} create/append/rename/"
                 f"delete ops/s and rewriting pages at {PAGE_BYTES_PER_S // MiB} MiB/s, "
                 f"--pause-pid, --downtime-limit {LIMIT_MS}")
    res.setup = (f"{files} files of 1–64 KiB on disk ({FILES_ENV}). Live: the writer starts, "
                 "works 1.5 s, then send (2 channels) runs with --pause-pid WRITER "
                 f"--downtime-limit {LIMIT_MS}; after send exits the writer must be stopped "
                 "(keep-paused), and the copy is compared with the source path by path (type, "
                 "mode, size, mtime, owner, content, hard links), untimed; then the writer is "
                 "killed. The writer's achieved rates are its own counters at its last report "
                 "before the pause. Static: multifd copy of the same tree at rest, interleaved. "
                 "After the rounds, a negative control: one live run with "
                 "MULTIFD_TEST_STALE_TREE=1 (the final pass reuses the previous walk), which must "
                 "not pass unnoticed: send may find it itself (exit 7, nothing at DEST), else "
                 "the comparison must find the copy different.")
    base, why = probe_tree_support(ctx.disk)
    if base is None:
        res.error = f"multifd cannot migrate a directory in this build: {why}"
        res.summary.append(["multifd", "not run", "-", why.rsplit(" exited ", 1)[-1][:160]])
        return
    src, dst = ctx.disk / "tree-live.src", ctx.disk / "tree-live.dst"
    shutil.rmtree(src, ignore_errors=True)
    make_tree(src, files, 64 * KiB, seed=11)
    seeds = iter(range(100, 10_000))

    def static() -> Sample:
        time.sleep(REST_S)  # the last live run's changes are at rest
        s = tree_migrate(src, dst)
        s["differences"] = tree_differences(src, dst)
        return s

    runs = interleave({"live": lambda: live_run(src, dst, next(seeds)), "static": static},
                      ctx.pairs, ctx.log)
    control = stale_control(src, dst, next(seeds))
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    lv, st = runs["live"], runs["static"]
    rt = ratio(secs(lv), secs(st))
    down = [x for x in secs(lv, "downtime_ms")]
    expected = [float(x["expected_downtime_ms"]) for x in lv
                if x.get("expected_downtime_ms") is not None]
    equal = [not x["differences"] for x in lv] + [not x["differences"] for x in st]
    wr = [x["writer"] for x in lv]
    op_rate = [w["ops"] / w["elapsed_s"] for w in wr]
    mib_rate = [w["bytes"] / MiB / w["elapsed_s"] for w in wr]
    res.tables.append(md_table(
        ["variant", "wall s", "downtime_ms", "expected_downtime_ms", "passes", "MiB sent",
         "copy equals the tree at the pause"],
        [["live", spread(secs(lv)), spread(down, 0), spread(expected, 0) if expected else "-",
          spread(secs(lv, "passes"), 0), spread(secs(lv, "transferred_bytes"), 0, 1 / MiB),
          f"{sum(not x['differences'] for x in lv)}/{len(lv)}"],
         ["static copy", spread(secs(st)), "-", "-", spread(secs(st, "passes"), 0),
          spread(secs(st, "transferred_bytes"), 0, 1 / MiB),
          f"{sum(not x['differences'] for x in st)}/{len(st)}"]]))
    res.tables.append(md_table(
        ["live run", "downtime_ms", "of it after the final pass (completion)",
         "pass: entries / tree_ops / files_read / duration_ms (F: final)"],
        [[i + 1, x["downtime_ms"], f"{x['after_final_pass_ms']:.0f}"
          if x.get("after_final_pass_ms") is not None else "-", "; ".join(f"{p['pass']}{'F' if p['final'] else ''}: {p['entries']} / "
                           f"{p['tree_ops']} / {p['files_read']} / {p['duration_ms']}"
                           for p in x["pass_events"])] for i, x in enumerate(lv)]))
    res.tables.append(md_table(
        ["writer, before the pause", "median (min–max)", "asked"],
        [["ops/s", spread(op_rate, 0), str(OPS_PER_S)],
         ["MiB/s of pages", spread(mib_rate, 1), str(PAGE_BYTES_PER_S // MiB)]]))
    caught = bool(control["differences"])
    d_ok = med(down) <= LIMIT_MS
    rows = [["downtime_ms", spread(down, 0), f"≤ {LIMIT_MS}",
             verdict(d_ok, f"{sum(d <= LIMIT_MS for d in down)}/{len(down)} runs")],
            ["copy equals the tree at the pause", f"{sum(equal)}/{len(equal)} runs", "all",
             verdict(all(equal), "; ".join(d for x in lv + st for d in x["differences"])[:300])],
            ["negative control: stale final walk", "caught" if caught else "NOT caught",
             "caught", verdict(caught, "; ".join(control["differences"])[:200])],
            ["live / static, wall", rt.text(), "-", "context"]]
    res.tables.append(md_table(["metric", "median (min–max)", "target", "verdict"], rows))
    res.summary += [["downtime_ms", spread(down, 0), f"≤ {LIMIT_MS}", verdict(d_ok)],
                    ["expected_downtime_ms", spread(expected, 0) if expected else "-", "-",
                     "context"],
                    ["copy = tree at the pause", f"{sum(equal)}/{len(equal)}", "all",
                     verdict(all(equal))],
                    ["stale-walk control caught", "yes" if caught else "no", "yes",
                     verdict(caught)],
                    ["passes", spread(secs(lv, "passes"), 0), "-", "context"]]
    if not all(equal) or not caught:
        res.error = "the copy differs from the tree at the pause" if not all(equal) else \
            "the negative control was not caught: the comparison proves nothing"
    res.raw = {"runs": runs, "control": control, "ratio": rt.as_json()}


# -- kernel tracker vs the stat rule on a live tree --------------------------------------

BIG_FILES_ENV = "MULTIFD_BENCH_TREE_TRACKER_MIB"
BIG_PAGES_PER_S = 200  # 4 KiB stores per second into each big file
BIG_WRITER_CODE = r"""
import mmap, os, random, struct, sys, time
pw, mm, rate, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
fd = os.open(pw, os.O_RDWR)
size = os.fstat(fd).st_size
mfd = os.open(mm, os.O_RDWR)
m = mmap.mmap(mfd, os.fstat(mfd).st_size, mmap.MAP_SHARED)
print("ready", flush=True)
n, t0 = 0, time.monotonic()
while True:
    while n < rate * (time.monotonic() - t0):
        n += 1
        data = struct.pack("<QQ", n, seed) * 256
        os.pwrite(fd, data, rnd.randrange(size // 4096) * 4096)
        at = rnd.randrange(len(m) // 4096) * 4096
        m[at:at + 4096] = data
    time.sleep(0.005)
"""


def tracker_run(src: Path, dst: Path, seed: int, tracker: str) -> Sample:
    """One live migration with --tracker TRACKER: the small-file writer on src/small, the
    big-file writer (pwrite and a shared mapping) on src/big; both paused at the end."""
    ws = [Proc([*CHILD.multifd[:1], "-c", WRITER_CODE, str(src / "small"), "50",
                str(1 * MiB), str(seed)]),
          Proc([*CHILD.multifd[:1], "-c", BIG_WRITER_CODE, str(src / "big" / "pwrite.dat"),
                str(src / "big" / "mmap.dat"), str(BIG_PAGES_PER_S), str(seed)])]
    try:
        for w in ws:
            if w.first_line().strip() != "ready":
                raise BenchError(f"writer: {w.stderr_tail()}")
        time.sleep(1.5)
        pause = [a for w in ws for a in ("--pause-pid", str(w.pid))]
        s = tree_migrate(src, dst, extra=["--tracker", tracker, *pause,
                                          "--downtime-limit", str(LIMIT_MS)])
        if any(process_state(w.pid) != "T" for w in ws) or not s["paused"]:
            raise BenchError("a writer is not paused after send exited")
        s["differences"] = tree_differences(src, dst)
    finally:
        for w in ws:
            w.signal(signal.SIGCONT)
            w.kill()
    return s


def _later_reads(s: Sample) -> list[float]:
    return [p["read_bytes"] for p in s["pass_events"] if p["pass"] > 1 and not p["final"]]


def _final_reads(s: Sample) -> float:
    return float(next(p["read_bytes"] for p in s["pass_events"] if p["final"]))


def case_tree_tracker(ctx: Ctx, res: CaseResult) -> None:
    """The same live tree with --tracker kernel and --tracker hash (the stat rule), interleaved."""
    text = os.environ.get(BIG_FILES_ENV, "")
    big = (int(text) if text.strip() else (64 if ctx.quick else 256)) * MiB
    res.title = (f"tree-tracker: a live tree (2,000 small files, 50 ops/s) with two "
                 f"{big // MiB} MiB files rewritten {BIG_PAGES_PER_S} pages/s each by pwrite "
                 "and through a shared mapping: --tracker kernel vs hash")
    res.setup = ("2,000 files of 1–64 KiB in small/ (the tree-live writer at 50 ops/s and "
                 f"1 MiB/s of pages) and big/pwrite.dat, big/mmap.dat of {big // MiB} MiB "
                 f"({BIG_FILES_ENV}) taking {BIG_PAGES_PER_S} random 4 KiB stores a second "
                 "each. Both writers start, work 1.5 s, then send (2 channels) runs with "
                 f"--pause-pid (both) --downtime-limit {LIMIT_MS} and --tracker kernel or hash, "
                 "interleaved; the copy is compared with the paused tree path by path. "
                 "read_bytes is the pass event's: what send's channels read from the tree. "
                 "The hash tracker reads a file whose stat moved, or that is mapped "
                 "shared-writable, whole; the kernel tracker reads the folios its window "
                 "reports.")
    base, why = probe_tree_support(ctx.disk)
    if base is None:
        res.error = f"multifd cannot migrate a directory in this build: {why}"
        return
    src, dst = ctx.disk / "tree-tracker.src", ctx.disk / "tree-tracker.dst"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    make_tree(src / "small", 2000, 64 * KiB, seed=12)
    (src / "big").mkdir()
    for name in ("pwrite.dat", "mmap.dat"):
        with open(src / "big" / name, "wb") as f:
            for _ in range(big // MiB):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
    seeds = iter(range(200, 10_000))
    runs = interleave({"kernel": lambda: tracker_run(src, dst, next(seeds), "kernel"),
                       "hash": lambda: tracker_run(src, dst, next(seeds), "hash")},
                      ctx.pairs, ctx.log)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    kn, hs = runs["kernel"], runs["hash"]
    rows = []
    for name, rs in (("kernel", kn), ("hash", hs)):
        later = [med(_later_reads(x)) for x in rs if _later_reads(x)]
        rows.append([name, spread(secs(rs, "downtime_ms"), 0), spread(secs(rs, "passes"), 0),
                     spread(later, 1, 1 / MiB), spread([_final_reads(x) for x in rs], 1, 1 / MiB),
                     spread(secs(rs), 2), f"{sum(not x['differences'] for x in rs)}/{len(rs)}"])
    res.tables.append(md_table(
        ["tracker", "downtime_ms", "passes", "MiB read per pass (2..n-1, median per run)",
         "MiB read, final pass", "wall s", "copy equals the tree at the pause"], rows))
    res.tables.append(md_table(
        ["run", "tracker", "pass: read MiB / files_read / duration_ms (F: final)"],
        [[i + 1, x["pass_events"][0]["tracker"], "; ".join(
            f"{p['pass']}{'F' if p['final'] else ''}: {p['read_bytes'] / MiB:.1f} / "
            f"{p['files_read']} / {p['duration_ms']}" for p in x["pass_events"])]
         for i, x in enumerate(kn + hs)]))
    down = ratio(secs(kn, "downtime_ms"), secs(hs, "downtime_ms"))
    final = ratio([_final_reads(x) for x in kn], [_final_reads(x) for x in hs])
    equal = all(not x["differences"] for x in kn + hs)
    res.summary += [
        ["kernel / hash, downtime", down.text(), "< 1", verdict(down.median < 1)],
        ["kernel / hash, final pass read", final.text(), "< 1", verdict(final.median < 1)],
        ["copy = tree at the pause", f"{sum(not x['differences'] for x in kn + hs)}/"
         f"{len(kn + hs)}", "all", verdict(equal)],
    ]
    if not equal:
        res.error = "the copy differs from the tree at the pause"
    res.raw = {"runs": runs, "downtime_ratio": down.as_json(), "final_ratio": final.as_json()}
