"""tree-pg: a PostgreSQL data directory under pgbench, migrated by multifd with
--pause-cgroup, against pg_basebackup of the same cluster.

pg_basebackup needs no pause (the server keeps running and the backup carries the
WAL to replay), so it has no downtime; it is here because it is the tool PostgreSQL
users know for copying a live cluster. The migration time is compared; multifd's
downtime is reported as it is.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from harness import BenchError, MiB, Sample
from harness.procs import Proc, free_port, timed
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave
from harness.stats import med, ratio, secs, spread

from cases.tree_static import probe_tree_support, remove_tree, tree_migrate

SCALE = 20  # pgbench scale: about 300 MiB of tables
CLIENTS = 4
LIMIT_MS = 300


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def cgroup2_root() -> Path | None:
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


def as_postgres(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                          text=True, check=False)


def checked(res: subprocess.CompletedProcess[str], what: str) -> str:
    if res.returncode != 0:
        raise BenchError(f"{what} exited {res.returncode}: {res.stderr.strip()[-300:]}")
    return res.stdout


class Cluster:
    """A throwaway cluster whose server runs in its own cgroup v2, under pgbench load."""

    def __init__(self, bindir: Path, work: Path, cg_root: Path) -> None:
        self.bin, self.work = bindir, work
        self.data = work / "data"
        self.port = free_port()
        self.cgroup = cg_root / f"multifd-bench-pg-{os.getpid()}"
        self.load: Proc | None = None
        self.switcher: Proc | None = None

    def psql(self, sql: str) -> str:
        return checked(as_postgres([str(self.bin / "psql"), "-h", str(self.work), "-p",
                                    str(self.port), "-d", "postgres", "-Atc", sql]), "psql")

    def start(self) -> None:
        checked(as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust",
                             "--no-sync", "-E", "UTF8", "--locale=C"]), "initdb")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = ''\n"
                    f"unix_socket_directories = '{self.work}'\nmax_wal_size = 64MB\n"
                    "min_wal_size = 32MB\ncheckpoint_timeout = 30s\n")
        self.cgroup.mkdir()
        # The shell moves itself into the cgroup, so pg_ctl and the server start inside it.
        checked(subprocess.run(
            ["sh", "-c", f"echo $$ > {self.cgroup}/cgroup.procs && exec runuser -u postgres -- "
             f"{self.bin / 'pg_ctl'} -D {self.data} -l {self.work / 'log'} -w start"],
            capture_output=True, text=True, check=False), "pg_ctl start")
        checked(as_postgres([str(self.bin / "pgbench"), "-i", "-q", "-s", str(SCALE), "-h",
                             str(self.work), "-p", str(self.port), "postgres"]), "pgbench -i")

    def start_load(self) -> None:
        """pgbench clients, and a loop that forces WAL segment switches as well."""
        self.load = Proc(["runuser", "-u", "postgres", "--", str(self.bin / "pgbench"), "-n",
                          "-c", str(CLIENTS), "-T", "3600", "-h", str(self.work), "-p",
                          str(self.port), "postgres"])
        self.switcher = Proc(["sh", "-c", f"while runuser -u postgres -- {self.bin / 'psql'} -h "
                              f"{self.work} -p {self.port} -d postgres -Atqc "
                              "'select pg_switch_wal()' >/dev/null; do sleep 1; done"])
        time.sleep(3)
        if not self.load.running:
            raise BenchError(f"pgbench stopped: {self.load.stderr_tail()}")

    def stop_load(self) -> None:
        for p in (self.load, self.switcher):
            if p is not None:
                p.kill()
        self.load = self.switcher = None

    def thaw(self) -> None:
        with contextlib.suppress(OSError):
            (self.cgroup / "cgroup.freeze").write_text("0\n")

    def stop(self) -> None:
        self.stop_load()
        self.thaw()
        as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
        with contextlib.suppress(OSError):
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                os.kill(int(pid), 9)
        for _ in range(50):
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
                break
            time.sleep(0.1)

    def wal_segments(self) -> set[str]:
        return {p.name for p in (self.data / "pg_wal").iterdir() if len(p.name) == 24}


def start_copy(bindir: Path, copy: Path, work: Path) -> str:
    """Start PostgreSQL on a copy (another port), read the pgbench_history count, stop it.

    The copy's postmaster.pid names the source's postmaster, which still runs on this
    host; on another host it would name nothing, so it is removed first.
    """
    (copy / "postmaster.pid").unlink(missing_ok=True)
    port = free_port()
    res = as_postgres([str(bindir / "pg_ctl"), "-D", str(copy), "-l", str(work / "copy.log"),
                       "-o", f"-p {port} -k {work}", "-w", "-t", "120", "start"])
    try:
        checked(res, "pg_ctl start on the copy")
        return checked(as_postgres([str(bindir / "psql"), "-h", str(work), "-p", str(port), "-d",
                                    "postgres", "-Atc", "select count(*) from pgbench_history"]),
                       "psql on the copy").strip()
    finally:
        as_postgres([str(bindir / "pg_ctl"), "-D", str(copy), "-m", "immediate", "stop"])


@contextlib.contextmanager
def running_cluster(bindir: Path, work: Path, cg_root: Path) -> Iterator[Cluster]:
    c = Cluster(bindir, work, cg_root)
    try:
        c.start()
        c.start_load()
        yield c
    finally:
        c.stop()


def case_tree_pg(ctx: Ctx, res: CaseResult) -> None:
    """multifd --pause-cgroup vs pg_basebackup of one cluster under pgbench, interleaved."""
    bindir, cg_root = pg_bin(), cgroup2_root()
    res.title = (f"tree-pg: a PostgreSQL data directory under pgbench ({CLIENTS} clients, scale "
                 f"{SCALE}), multifd --pause-cgroup vs pg_basebackup")
    res.setup = ("initdb into a directory on disk, max_wal_size 64MB, checkpoint_timeout 30s; the "
                 "server runs in its own cgroup v2; pgbench -c 4 runs throughout, with "
                 "pg_switch_wal() every second. multifd: send DATA --pause-cgroup CG "
                 f"--downtime-limit {LIMIT_MS} --after-success resume (2 channels), timed from "
                 "starting send to its exit. pg_basebackup: `-X stream -c fast` into a new "
                 "directory (it fsyncs), timed to its exit, no pause. Each copy is removed "
                 "(untimed) before the next run. multifd's first copy is started as a server "
                 "on another port (its postmaster.pid removed: it names the source's postmaster, "
                 "alive on this host) and must answer a query.")
    missing = []
    if bindir is None or shutil.which("pg_basebackup") is None:
        missing.append("PostgreSQL (`apt-get install postgresql`)")
    if cg_root is None:
        missing.append("a cgroup v2 mount")
    if os.getuid() != 0:
        missing.append("root (for runuser and the cgroup)")
    if missing:
        res.summary.append(["tree-pg", "skipped", "-", "needs " + ", ".join(missing)])
        return
    assert bindir is not None and cg_root is not None
    base, why = probe_tree_support(ctx.disk)
    if base is None:
        res.error = f"multifd cannot migrate a directory in this build: {why}"
        return
    # The bench's work dir is root's and 0700: the postgres user gets a directory of its own.
    work = Path(tempfile.mkdtemp(prefix="multifd-bench-pg-", dir=ctx.disk.parent))
    shutil.chown(work, "postgres", "postgres")
    mdst, bdst = work / "copy.multifd", work / "copy.basebackup"
    started: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        c = stack.enter_context(running_cluster(bindir, work, cg_root))
        wal0 = c.wal_segments()

        def multifd() -> Sample:
            s = tree_migrate(c.data, mdst, extra=["--pause-cgroup", str(c.cgroup),
                                                  "--downtime-limit", str(LIMIT_MS),
                                                  "--after-success", "resume"])
            if not started:
                started.append(start_copy(bindir, mdst, work))
            remove_tree(mdst)
            return s

        def basebackup() -> Sample:
            remove_tree(bdst)
            s = {"s": timed([["runuser", "-u", "postgres", "--", "pg_basebackup", "-D",
                              str(bdst), "-h", str(work), "-p", str(c.port), "-X", "stream",
                              "-c", "fast"]])[0]}
            remove_tree(bdst)
            return s

        runs = interleave({"multifd --pause-cgroup": multifd, "pg_basebackup": basebackup},
                          ctx.pairs, ctx.log)
        wal_moved = len(c.wal_segments() ^ wal0)
        size = sum(p.stat().st_size for p in c.data.rglob("*") if p.is_file())
    m, b = runs["multifd --pause-cgroup"], runs["pg_basebackup"]
    rt = ratio(secs(m), secs(b))
    down = secs(m, "downtime_ms")
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "downtime_ms", "expected_downtime_ms", "passes",
         "MiB sent"],
        [["multifd --pause-cgroup", spread(secs(m)), spread(down, 0),
          spread([float(x["expected_downtime_ms"]) for x in m
                  if x.get("expected_downtime_ms") is not None], 0),
          spread(secs(m, "passes"), 0), spread(secs(m, "transferred_bytes"), 0, 1 / MiB)],
         ["pg_basebackup", spread(secs(b)), "0 (no pause)", "-", "-", "-"]]))
    res.tables.append(md_table(
        ["metric", "value", "verdict"],
        [["multifd / pg_basebackup, wall", rt.text(), "context"],
         ["data directory at the end", f"{size / MiB:.0f} MiB", "-"],
         ["WAL segment names that came or went during the case", str(wal_moved),
          verdict(wal_moved > 0)],
         ["multifd's first copy started; pgbench_history rows", started[0] if started else "-",
          verdict(bool(started))]]))
    res.summary += [["multifd / pg_basebackup, wall", rt.text(), "-", "context"],
                    ["multifd downtime_ms", spread(down, 0), f"≤ {LIMIT_MS}",
                     verdict(med(down) <= LIMIT_MS)]]
    res.raw = {"runs": runs, "ratio": rt.as_json(), "wal_moved": wal_moved, "bytes": size}
