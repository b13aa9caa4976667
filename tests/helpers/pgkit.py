"""A real PostgreSQL cluster for the directory-tree tests: initdb as the postgres user in
a directory of its own, a server whose processes live in a cgroup v2 (so one freeze
pauses all of them), pgbench load, WAL churn, and the TPC-B figures two clusters must
agree on.

Debian's `postgresql` package puts initdb and pg_ctl under /usr/lib/postgresql/*/bin,
not on PATH, and starts its own cluster on 5432; these clusters take free ports and
keep their sockets outside the data directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers.mfdkit import assert_within, children, free_port

PG_USER = "postgres"


def pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb, pg_ctl, psql and pgbench."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if all(os.access(os.path.join(d, x), os.X_OK)
               for x in ("initdb", "pg_ctl", "psql", "pgbench", "postgres")):
            with contextlib.suppress(ValueError):
                found.append((float(Path(d).parent.name), Path(d)))
    return max(found)[1] if found else None


def cgroup2_root() -> Path | None:
    """Where cgroup v2 is mounted, from /proc/mounts (None without one)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


def why_not() -> str:
    """'' when this machine can run the PostgreSQL tests, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root (initdb as postgres, a cgroup of its own)"
    if pg_bin() is None:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin with initdb)"
    if shutil.which("runuser") is None:
        return "no runuser (util-linux) to run initdb as postgres"
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return "no postgres user"
    root = cgroup2_root()
    if root is None:
        return "no cgroup v2 mount in /proc/mounts"
    if not os.access(root, os.W_OK):
        return f"cannot create a cgroup under {root}"
    return ""


def as_postgres(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", PG_USER, "--", *argv], capture_output=True, text=True,
                          cwd="/", timeout=timeout)


def owned_dir(prefix: str) -> Path:
    """A fresh directory under /tmp owned by postgres, mode 0700 (pytest's tmp_path is
    root's and 0700, so the postgres user could not even reach it)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    pw = pwd.getpwnam(PG_USER)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chmod(d, 0o700)
    return d


# -- a cgroup ---------------------------------------------------------------------------------------


class Cgroup:
    """A cgroup v2 of its own under the cgroup2 mount."""

    def __init__(self, name: str) -> None:
        root = cgroup2_root()
        assert root is not None
        self.path = root / name
        self.path.mkdir()

    def procs(self) -> list[int]:
        return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]

    def add(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            (self.path / "cgroup.procs").write_text(str(pid))

    def frozen(self) -> bool:
        for line in (self.path / "cgroup.events").read_text().splitlines():
            if line.startswith("frozen "):
                return line.split()[1] == "1"
        return False

    def freeze(self, on: bool) -> None:
        (self.path / "cgroup.freeze").write_text("1" if on else "0")
        assert_within(lambda: self.frozen() == on, 10, f"cgroup frozen={on}")

    def kill_all(self) -> None:
        """SIGKILL every process in it, frozen or not (a crash), then thaw so they die."""
        victims = self.procs()
        kill = self.path / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        else:
            for pid in self.procs():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        (self.path / "cgroup.freeze").write_text("0")
        assert_within(lambda: not self.procs(), 20, "the cgroup's processes to die")
        # Gone from /proc too: a zombie still answers kill(pid, 0), and PostgreSQL would
        # take its postmaster.pid for a live server.
        assert_within(lambda: not any(os.path.exists(f"/proc/{p}") for p in victims), 30,
                      "the killed processes to be reaped")

    def remove(self) -> None:
        if not self.path.exists():
            return
        with contextlib.suppress(OSError):
            (self.path / "cgroup.freeze").write_text("0")
        if self.procs():
            self.kill_all()
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def move_tree(pid: int, cg: Cgroup) -> list[int]:
    """Move PID and all its children into CG; children forked while this runs are
    caught by going round until every one is there (new ones inherit the cgroup once
    their parent is in it)."""
    cg.add(pid)
    for _ in range(50):
        missing = [c for c in children(pid) if c not in cg.procs()]
        if not missing:
            return cg.procs()
        for c in missing:
            cg.add(c)
    raise AssertionError(f"children of {pid} keep escaping {cg.path}")


# -- a cluster ----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """One PostgreSQL data directory and, while started, its server on PORT (TCP on
    127.0.0.1, socket in SOCKDIR), trust authentication for the postgres role."""

    datadir: Path
    sockdir: Path
    port: int = field(default_factory=free_port)
    log: Path | None = None

    @property
    def bin(self) -> Path:
        b = pg_bin()
        assert b is not None
        return b

    def initdb(self, settings: dict[str, str]) -> None:
        res = as_postgres([str(self.bin / "initdb"), "-D", str(self.datadir), "--auth=trust",
                           "--no-sync", "-E", "UTF8", "--locale=C"], timeout=120)
        assert res.returncode == 0, res.stderr
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")

    def start(self) -> None:
        """pg_ctl start, waiting until it accepts connections (which, after a crash,
        means recovery finished)."""
        self.log = self.sockdir / f"log-{self.port}"
        res = as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log),
                           "-w", "-t", "90", "-o",
                           f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1",
                           "start"], timeout=120)
        assert res.returncode == 0, f"{res.stdout}{res.stderr}\n{self.log_text()}"

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-3000:] if self.log else ""
        return ""

    def postmaster(self) -> int:
        return int((self.datadir / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop it if it runs (fast shutdown, then SIGKILL of whatever is left)."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                         "-w", "-t", "20", "stop"], timeout=30)

    def conn(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER]

    def sql(self, query: str, db: str = "postgres") -> str:
        res = subprocess.run([str(self.bin / "psql"), *self.conn(), "-d", db, "-XAtq",
                              "-v", "ON_ERROR_STOP=1", "-c", query],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{query}: {res.stderr}"
        return res.stdout.strip()

    def pgbench(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "pgbench"), *self.conn(), *args, "postgres"],
                              capture_output=True, text=True, timeout=timeout)

    def pgbench_load(self, clients: int, seconds: int) -> subprocess.Popen[str]:
        """pgbench's TPC-B-like load in the background (the client is not in the
        server's cgroup: a freeze pauses the server, and the client waits)."""
        return subprocess.Popen([str(self.bin / "pgbench"), *self.conn(), "-c", str(clients),
                                 "-T", str(seconds), "-n", "postgres"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)

    def figures(self) -> dict[str, int]:
        """What two clusters that hold the same committed state agree on."""
        q = ("SELECT (SELECT count(*) FROM pgbench_history), "
             "(SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
             "(SELECT sum(abalance) FROM pgbench_accounts), "
             "(SELECT sum(tbalance) FROM pgbench_tellers), "
             "(SELECT sum(bbalance) FROM pgbench_branches), "
             "(SELECT count(*) FROM pgbench_accounts)")
        vals = [int(x) for x in self.sql(q).split("|")]
        keys = ["history", "delta", "abalance", "tbalance", "bbalance", "accounts"]
        return dict(zip(keys, vals))


class WalChurn:
    """A thread that switches WAL segments and checkpoints in a loop through one psql
    session, so segments are created, recycled (renamed) and removed, and a second one
    that records pg_wal's listing (name -> inode) as it goes."""

    def __init__(self, cluster: Cluster, period: float = 0.15) -> None:
        self.cluster = cluster
        self.period = period
        self.stop_ev = threading.Event()
        self.wal = cluster.datadir / "pg_wal"
        self.seen: list[dict[str, int]] = []
        self.lock = threading.Lock()
        self.psql = subprocess.Popen(
            [str(cluster.bin / "psql"), *cluster.conn(), "-d", "postgres", "-Xq", "-o", os.devnull],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        self.threads = [threading.Thread(target=self._switch, daemon=True),
                        threading.Thread(target=self._watch, daemon=True)]
        for t in self.threads:
            t.start()

    def listing(self) -> dict[str, int]:
        out = {}
        for e in os.scandir(self.wal):
            if len(e.name) == 24 and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    out[e.name] = e.inode()
        return out

    def _switch(self) -> None:
        n = 0
        assert self.psql.stdin is not None
        while not self.stop_ev.wait(self.period):
            n += 1
            line = "CHECKPOINT;\n" if n % 4 == 0 else "SELECT pg_switch_wal();\n"
            try:
                self.psql.stdin.write(line)
                self.psql.stdin.flush()
            except (BrokenPipeError, ValueError):
                return

    def _watch(self) -> None:
        while not self.stop_ev.wait(0.03):
            with contextlib.suppress(OSError):
                snap = self.listing()
                with self.lock:
                    self.seen.append(snap)

    def mark(self) -> int:
        """An index into the recorded listings: churn() counts from here."""
        with self.lock:
            self.seen.append(self.listing())
            return len(self.seen) - 1

    def churn(self, since: int, until: int | None = None) -> dict[str, list[str]]:
        """What pg_wal did between two marks: segment names created (a new inode),
        recycled (an inode seen under one name, later under another) and removed (an
        inode gone)."""
        with self.lock:
            snaps = self.seen[since:None if until is None else until + 1]
        names_of: dict[int, list[str]] = {}
        for snap in snaps:
            for name, ino in snap.items():
                names = names_of.setdefault(ino, [])
                if not names or names[-1] != name:
                    names.append(name)
        first, last = snaps[0], snaps[-1]
        return {
            "created": sorted(n[0] for ino, n in names_of.items() if ino not in first.values()),
            "recycled": sorted(f"{n[0]}->{n[-1]}" for n in names_of.values() if len(n) > 1),
            "removed": sorted(n[-1] for ino, n in names_of.items() if ino not in last.values()),
        }

    def stop(self) -> None:
        self.stop_ev.set()
        if self.psql.stdin is not None:
            with contextlib.suppress(OSError):
                self.psql.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.psql.pid, signal.SIGKILL)
        self.psql.wait(10)
        for t in self.threads:
            t.join(5)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
