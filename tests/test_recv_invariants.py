"""recv's invariants under faults, found by a review of sink.py, receiver.py, restore.py
and image.py (and the CLI in front of them):

1. no file is ever left under DEST's name unless it is complete and verified;
2. every bad input gets one `multifd: error:` line and a documented exit code, never a
   traceback and never exit 1 ("internal error", which means a bug);
3. a failed or killed receive does not destroy a pre-existing DEST;
4. temporary files are cleaned up (or at least by the next run of the same DEST).

Every test here failed on the code it was written against (each docstring says what
was observed then) and passes since sink.py's fixes: naming through Naming (recv/naming.py) (an exchange
that can be undone until the directory fsync), clean-up on any exception, stray hidden
names removed under DEST's lock, and lstat-aware checks of DEST. Windows that last microseconds (between linkat() and rename(), around the
directory fsync) are held open with strace's fault injection (delay or error) on recv's
main thread only, so those tests skip where strace cannot attach.
"""

from __future__ import annotations

import contextlib
import os
import platform
import select
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.mfdkit import MULTIFD, Kit, assert_within, entries, sha256, spawn, write_random

MiB = 1 << 20
EXIT_USAGE, EXIT_PROTOCOL, EXIT_VERIFY, EXIT_IO, EXIT_PAUSE, EXIT_SIGTERM = 2, 4, 6, 7, 8, 143

#: Syscall numbers, to see from /proc/PID/syscall that recv sits in a delayed call.
SYSCALLS = {
    "x86_64": {"link": 86, "linkat": 265, "rename": 82, "renameat": 264, "renameat2": 316},
    "aarch64": {"linkat": 37, "renameat": 38, "renameat2": 276},
}


# -- strace: hold a window open, or make a syscall fail ------------------------------------------


def syscall_numbers(*names: str) -> set[int]:
    table = SYSCALLS.get(platform.machine())
    if table is None:
        pytest.skip(f"no syscall table for {platform.machine()}")
    return {table[n] for n in names if n in table}


def rename_family() -> list[str]:
    return [n for n in ("rename", "renameat", "renameat2") if n in SYSCALLS.get(platform.machine(), {})]


def naming_calls() -> list[str]:
    """Every call that can give a file DEST's name: the rename family and link/linkat."""
    return [*rename_family(), *(n for n in ("link", "linkat") if n in SYSCALLS.get(platform.machine(), {}))]


class Strace:
    """strace attached to one thread (recv's main thread: its pid) with a tamper spec."""

    def __init__(self, pid: int, log: Path, *spec: str) -> None:
        self.pid = pid
        self.log = log
        self.popen = subprocess.Popen(
            ["strace", "-o", str(log), *spec, "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        assert self.popen.stderr is not None
        ready, _, _ = select.select([self.popen.stderr], [], [], 20)
        line = self.popen.stderr.readline() if ready else ""
        if "attached" not in line:
            self.stop()
            pytest.skip(f"strace did not attach: {line.strip()!r}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()  # detaches; the tracee goes on
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""


def in_syscall(pid: int, numbers: set[int]) -> bool:
    """True while the thread `pid` sits in one of these syscalls (e.g. held by a delay)."""
    try:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return first.isdigit() and int(first) in numbers


def hidden(d: Path) -> list[str]:
    return [n for n in entries(d) if ".multifd-" in n]


# -- 3/4: the window between naming the copy and putting it in place ------------------------------


@pytest.mark.parametrize("shape", ["file-force", "dir"])
def test_sigterm_while_naming_the_copy_leaves_no_temp_name(kit: Kit, tmp_path: Path,
                                                          strace_ok: None, shape: str) -> None:
    """SIGTERM while recv's main thread is in linkat(), naming the verified unnamed file:
    - file-force: DEST exists and --force: publish_file (recv/naming.py) links the file to a hidden name
      `.dest.multifd-XXXXXXXX`, then renames that over DEST;
    - dir: two sources: publish_dir links each block into a staging directory
      `.out.multifd-XXXXXXXX`.
    The signal's Interrupted is a KeyboardInterrupt: the `except OSError` clean-ups skip
    it, and discard() knows only BlockFiles.tmp_names, so recv exits 143 and leaves the hidden
    name (a complete copy, or a staging directory with some blocks) behind for good.

    FAILS at the time of writing: `.dest.multifd-XXXXXXXX` (file-force), or the staging
    directory `.out.multifd-XXXXXXXX` (dir), is left next to DEST."""
    d = tmp_path / "d"
    d.mkdir()
    if shape == "file-force":
        src = write_random(tmp_path / "src", 4 * MiB, seed=61)
        dest = write_random(d / "dest", MiB, seed=62)
        old = sha256(dest)
        sources: list[Path] = [src]
        r, uri = kit.recv(dest, "--force")
    else:
        (tmp_path / "vm").mkdir()
        sources = [write_random(tmp_path / "vm" / "a.img", 2 * MiB, seed=63),
                   write_random(tmp_path / "vm" / "b.img", 2 * MiB, seed=64)]
        dest = d / "out"
        r, uri = kit.recv(dest)
    st = Strace(r.pid, tmp_path / "strace.log", "-e", "trace=linkat",
                "-e", "inject=linkat:delay_enter=5000000")
    try:
        s = kit.start(["send", "--json", "--timeout", "20", *map(str, sources), "--to", uri])
        assert_within(lambda: in_syscall(r.pid, syscall_numbers("linkat")), 20,
                      "recv's main thread in the delayed linkat()", 0.005)
        r.signal(signal.SIGTERM)
        rd, sd = r.wait(30), s.wait(30)
    finally:
        st.stop()
    assert "DELAYED" in st.text(), st.text()
    assert rd.error(EXIT_SIGTERM) == "terminated by SIGTERM"
    sd.error(EXIT_SIGTERM, 3)
    if shape == "file-force":
        assert sha256(dest) == old, "a failed receive replaced DEST"
        assert entries(d) == ["dest"], f"left behind after SIGTERM: {hidden(d)}"
    else:
        assert entries(d) == [], f"left behind after SIGTERM: {entries(d)}"


def test_directory_fsync_failure_does_not_cost_the_old_dest(kit: Kit, tmp_path: Path,
                                                            strace_ok: None) -> None:
    """finalize() is fsync(file), rename over DEST, fsync(directory) (Destination.finalize). The
    directory fsync can fail (EIO, injected here on the directory's fd only): recv then
    exits 7 and send exits 7, the source's writer is resumed as after any failure, but
    the old DEST (--force) is already gone, replaced by the new copy. README: "An
    existing DEST is untouched on failure".

    FAILS at the time of writing: recv exit 7 "fsync of directory ... failed:
    Input/output error", and DEST holds the new copy, not the old one."""
    src = write_random(tmp_path / "src", 4 * MiB, seed=65)
    d = tmp_path / "d"
    d.mkdir()
    dest = write_random(d / "dest", MiB, seed=66)
    old = sha256(dest)
    r, uri = kit.recv(dest, "--force")
    st = Strace(r.pid, tmp_path / "strace.log", "-P", str(d), "-e", "trace=fsync",
                "-e", "inject=fsync:error=EIO")
    try:
        s = kit.send(src, uri)
        rd, sd = r.wait(30), s.wait(30)
    finally:
        st.stop()
    if rd.code == 0:
        sd.ok()
        assert sha256(dest) == sha256(src)
        return
    assert "INJECTED" in st.text(), st.text()
    rd.error(EXIT_IO)
    sd.error(EXIT_IO)
    assert sha256(dest) == old, "recv failed (exit 7) after it had replaced the old DEST"
    assert entries(d) == ["dest"]


@pytest.mark.parametrize("how", ["sigkill-before-rename", "sigkill-without-o-tmpfile"])
def test_temp_files_of_a_killed_recv_are_cleaned_by_the_next_one(kit: Kit, tmp_path: Path,
                                                                 strace_ok: None,
                                                                 how: str) -> None:
    """What a SIGKILL of recv's main can leave in DEST's directory, and whether anything
    ever removes it:
    - sigkill-before-rename: with --force, between linkat() of the verified file to
      `.dest.multifd-XXXXXXXX` and the rename over DEST (publish_file): a complete copy
      under a hidden name (held open here by delaying rename());
    - sigkill-without-o-tmpfile: where O_TMPFILE is unsupported (NFS, FUSE, CIFS;
      simulated with EOPNOTSUPP on the O_TMPFILE open of DEST's directory), the copy is
      written under `.dest.multifd-XXXXXXXX` from the start (BlockFiles.create_unnamed), so a
      SIGKILL mid-pass leaves a half-written file the size of the source. README only
      claims "an unnamed O_TMPFILE ... even after SIGKILL".
    Neither is reused, documented, or cleaned: a later recv of the same DEST (which holds
    DEST's lock, so no other recv can own such a name) leaves them there forever.

    FAILS at the time of writing: after a successful second migration the directory still
    holds `.dest.multifd-XXXXXXXX` next to `dest`."""
    src = write_random(tmp_path / "src", 32 * MiB, seed=67)
    d = tmp_path / "d"
    d.mkdir()
    dest = write_random(d / "dest", MiB, seed=68)
    log = tmp_path / "strace.log"
    if how == "sigkill-before-rename":
        fam = ",".join(rename_family())
        r, uri = kit.recv(dest, "--force")
        st = Strace(r.pid, log, "-e", f"trace={fam}", "-e", f"inject={fam}:delay_enter=5000000")
        try:
            s = kit.send(src, uri)
            assert_within(lambda: in_syscall(r.pid, syscall_numbers(*rename_family())), 30,
                          "recv's main thread in the delayed rename()", 0.005)
            os.kill(r.pid, signal.SIGKILL)
            assert r.wait(20).code == -signal.SIGKILL
            s.wait(30)
        finally:
            st.stop()
    else:
        r, uri = kit.recv(dest, "--force", "--json-interval", "0.1")
        st = Strace(r.pid, log, "-P", str(d), "-e", "trace=openat",
                    "-e", "inject=openat:error=EOPNOTSUPP:when=1")
        try:
            s = kit.send(src, uri, "--max-bandwidth", "16M")
            r.wait_for(lambda e: e["event"] == "progress" and e["transferred_bytes"] >= 4 * MiB,
                       30, "pass 1 under way")
            os.kill(r.pid, signal.SIGKILL)
            assert r.wait(20).code == -signal.SIGKILL
            s.wait(30)
        finally:
            st.stop()
    left = hidden(d)
    assert left, f"the window was not hit: {entries(d)}\n{st.text()}"  # precondition
    assert (d / "dest").exists()
    # A second, ordinary migration into the same DEST.
    r2, uri2 = kit.recv(dest, "--force")
    s2 = kit.send(src, uri2)
    s2.wait(60).ok()
    r2.wait(60).ok()
    assert sha256(dest) == sha256(src)
    assert entries(d) == ["dest"], f"never cleaned: {hidden(d)} (left by the killed recv: {left})"


def test_without_o_tmpfile_a_dest_that_appears_meanwhile_is_not_replaced(kit: Kit,
                                                                        tmp_path: Path,
                                                                        strace_ok: None) -> None:
    """Without --force, a DEST that appears during the migration must not be replaced
    ("... appeared during the migration; not replacing it"). With O_TMPFILE, linkat()
    guarantees it (EEXIST). Where O_TMPFILE is unsupported (simulated: EOPNOTSUPP on the
    O_TMPFILE open of DEST's directory), publishing checked os.path.lexists(target) and
    then os.replace()d: a check-then-act race that silently replaces
    whatever appeared in between (held open here by delaying the rename() or link() that names it).

    FAILS at the time of writing: recv exits 0 and the file that appeared at DEST is
    gone, replaced by the copy."""
    src = write_random(tmp_path / "src", 8 * MiB, seed=72)
    d = tmp_path / "d"
    d.mkdir()
    dest = d / "dest"
    fam = ",".join(naming_calls())
    r, uri = kit.recv(dest)
    st = Strace(r.pid, tmp_path / "strace.log", "-P", str(d), "-e", "trace=openat",
                "-e", "inject=openat:error=EOPNOTSUPP:when=1")
    try:
        s = kit.send(src, uri, "--max-bandwidth", "16M")
        assert_within(lambda: hidden(d), 20, "the fallback's hidden file", 0.005)
    finally:
        st.stop()
    st2 = Strace(r.pid, tmp_path / "strace2.log", "-e", f"trace={fam}",
                 "-e", f"inject={fam}:delay_enter=3000000")
    try:
        assert_within(lambda: in_syscall(r.pid, syscall_numbers(*naming_calls())), 30,
                      "recv's main thread in a delayed rename() or link()", 0.005)
        dest.write_bytes(b"someone else's file\n")  # appears while recv names its copy
        rd, sd = r.wait(30), s.wait(30)
    finally:
        st2.stop()
    assert "EOPNOTSUPP" in st.text(), st.text()  # the fallback was taken
    assert dest.read_bytes() == b"someone else's file\n", \
        f"recv (exit {rd.code}) replaced a DEST that appeared during the migration"
    rd.error(EXIT_IO)
    sd.error(EXIT_IO)


# -- 2: bad DEST paths ------------------------------------------------------------------------------


def test_a_dangling_symlink_dest_is_refused_up_front(tmp_path: Path) -> None:
    """Destination.check() uses os.stat(), which follows the link, so a
    dangling symlink at DEST counts as "no DEST": recv listens and takes the whole
    migration, and only at the end linkat() fails with EEXIST and recv exits 7 with a
    false message ("... appeared during the migration; not replacing it"), send too.
    Expected: refused before listening, exit 2, like any existing DEST without --force
    (or, if it is meant to be replaced, replaced; but never after moving every byte).

    FAILS at the time of writing: recv listens (here: until --timeout 3, exit 3)."""
    d = tmp_path / "d"
    d.mkdir()
    dest = d / "dest"
    dest.symlink_to(d / "nowhere")
    recv = spawn(["recv", "--json", "--timeout", "3", str(dest)])
    code = recv.wait(30)
    assert not recv.of("listening"), f"recv listened for a session into a dangling symlink " \
                                     f"(exit {code}): {recv.stderr}"
    assert code == EXIT_USAGE, recv.stderr
    assert dest.is_symlink() and os.readlink(dest) == str(d / "nowhere")


@pytest.mark.parametrize("what", ["symlink-loop", "name-too-long"])
def test_an_unusable_dest_path_is_a_usage_error(tmp_path: Path, what: str) -> None:
    """os.stat(DEST) in Destination.check() catches only FileNotFoundError;
    ELOOP or ENAMETOOLONG escape as a bare OSError.

    FAILS at the time of writing: exit 1, "multifd: error: internal error: OSError:
    [Errno 40] Too many levels of symbolic links ... (run with --debug for a traceback)"
    (or [Errno 36] File name too long)."""
    if what == "symlink-loop":
        dest = tmp_path / "loop"
        dest.symlink_to("loop")
    else:
        dest = tmp_path / ("x" * 300)
    proc = subprocess.run([*MULTIFD, "recv", "--timeout", "2", str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("multifd: error:"), proc.stderr
