"""Bad inputs, swept systematically: every one must end with exactly one
`multifd: error:` line on stderr (the last line), a documented exit code (2..9),
never a traceback and never exit 1 (an internal error, i.e. a bug); no DEST
appears unless complete, and no process keeps running (README "Exit codes").

Each test here failed on the code it was written against; the docstrings say
what happened instead. Inputs that already behave are not repeated here (see
test_exit_codes.py and the option checks of test_startup.py / test_units.py).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers.mfdkit import MULTIFD, child_env, free_port, kill_group, read_event, write_random

MiB = 1 << 20
HUGE = "1" + "0" * 400  # a whole number, but float() of it is inf
DOCUMENTED = {2, 3, 4, 5, 6, 7, 8, 9}


# -- helpers (the style of test_exit_codes.py) ------------------------------------------------------


@dataclass
class Done:
    code: int | None  # None: still running after the test's deadline (then killed)
    out: str
    err: str
    seconds: float = 0.0

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def _limit_memory(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


class Proc:
    """A multifd process (optionally started through `sh -c`), in its own session."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, *,
                 shell_wrap: str = "", preexec: Callable[[], None] | None = None) -> None:
        full_env = child_env(env)
        argv = [*MULTIFD, *args]
        if shell_wrap:  # e.g. 'exec {cmd} --pause-pid $$' or 'exec {cmd} >&-'
            argv = ["sh", "-c", shell_wrap.format(cmd=shlex.join(argv))]
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True, env=full_env,
                                      start_new_session=True, preexec_fn=preexec)
        self.started = time.monotonic()
        self.head = ""

    def readline(self, timeout: float = 20.0) -> dict[str, Any]:
        line, event = read_event(self.popen, timeout)
        self.head += line
        return event

    def done(self, timeout: float = 30.0, on_hang: Callable[[], None] | None = None) -> Done:
        """Wait up to `timeout`; a process still running then is killed, code None.
        `on_hang` runs first (e.g. to thaw a cgroup, so that SIGKILL can work)."""
        try:
            out, err = self.popen.communicate(timeout=timeout)
            code: int | None = self.popen.returncode
        except subprocess.TimeoutExpired:
            if on_hang is not None:
                on_hang()
            self.kill()
            try:
                # a forked child in its own session (send's watchdog) may hold the pipes
                out, err = self.popen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = "", "(output lost: the pipes stayed open)"
            code = None
        return Done(code, self.head + (out or ""), err or "", time.monotonic() - self.started)

    def kill(self) -> None:
        if self.popen.poll() is None:
            kill_group(self.popen)


class Procs:
    def __init__(self) -> None:
        self.all: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str] | None = None, **kw: Any) -> Proc:
        p = Proc(args, env, **kw)
        self.all.append(p)
        return p

    def recv(self, dest: Path, *args: str, timeout: str = "5") -> tuple[Proc, str]:
        p = self.start(["recv", "--json", "--timeout", timeout, *args, str(dest)])
        ev = p.readline()
        assert ev["event"] == "listening", ev
        return p, ev["uri"]

    def cleanup(self) -> None:
        for p in self.all:
            p.kill()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.cleanup()


def error_line(d: Done, codes: int | set[int]) -> str:
    """One of `codes`, one `multifd: error:` line, last on stderr, no traceback."""
    codes = {codes} if isinstance(codes, int) else codes
    assert d.code is not None, (f"still running after {d.seconds:.0f} s (killed)\n"
                                f"stdout:\n{d.out}\nstderr:\n{d.err}")
    assert d.code in codes, f"exit {d.code}, expected {sorted(codes)}\nstdout:\n{d.out}\nstderr:\n{d.err}"
    assert "Traceback" not in d.err, d.err
    lines = d.err.rstrip("\n").splitlines()
    errors = [ln for ln in lines if ln.startswith("multifd: error:")]
    assert len(errors) == 1, f"expected one error line on stderr:\n{d.err}"
    assert lines[-1] == errors[0], f"the error line is not the last line:\n{d.err}"
    return errors[0][len("multifd: error: "):]


def closed_uri() -> str:
    """A tcp: URI nobody listens on: send gives up after its --timeout (exit 3)."""
    return f"tcp:127.0.0.1:{free_port()}"


def send_args(src: Path, to: str, *extra: str, timeout: str = "1") -> list[str]:
    return ["send", "--timeout", timeout, str(src), "--to", to, *extra]


# -- sizes and rates: a number too big for a float --------------------------------------------------


@pytest.mark.parametrize("option", ["--packet-size", "--page-size", "--max-bandwidth"])
def test_huge_size_is_a_usage_error(procs: Procs, tmp_path: Path, option: str) -> None:
    """`--packet-size 1000...0` (400 digits) exits 1: "internal error: OverflowError:
    cannot convert float infinity to integer". parse_size() (config.py) computes
    float(number) * base**power, which is inf, then int(inf)."""
    src = write_random(tmp_path / "src", 4096)
    d = procs.start(send_args(src, closed_uri(), option, HUGE)).done(20)
    msg = error_line(d, 2)
    assert option in msg, msg


# -- float options: nan, inf, and finite values too big for the OS ------------------------------------


FLOAT_CASES = [
    # (id, argv builder, env): every one is a usage error, found before anything connects
    ("send-timeout-nan", ["--timeout", "nan"], {}),
    ("send-timeout-inf", ["--timeout", "inf"], {}),
    ("send-timeout-1e300", ["--timeout", "1e300"], {}),
    ("send-env-timeout-inf", [], {"MULTIFD_TIMEOUT": "inf"}),
    ("send-downtime-limit-nan", ["--downtime-limit", "nan"], {}),
    ("send-json-interval-nan", ["--json-interval", "nan"], {}),
]


@pytest.mark.parametrize(("argv", "env"), [(a, e) for _, a, e in FLOAT_CASES],
                         ids=[i for i, _, _ in FLOAT_CASES])
def test_send_non_finite_float_is_a_usage_error(procs: Procs, tmp_path: Path,
                                                argv: list[str], env: dict[str, str]) -> None:
    """click.FloatRange(min=...) lets nan through (every comparison with nan is
    false) and inf too. Found on the code at the time of writing:
    --timeout nan: send retries its connection forever (transport.connect's
    `time.monotonic() >= deadline` is never true), it never exits;
    --timeout inf / 1e300 / MULTIFD_TIMEOUT=inf: exit 1, "OverflowError: timestamp
    out of range for platform time_t" (sock.settimeout in transport.connect);
    --downtime-limit nan: accepted, no pass ever fits the limit, so send runs
    --max-passes passes and forces the switchover (`multifd set downtime-limit nan`
    on the control socket is refused, so the CLI option is the odd one out);
    --json-interval nan: accepted.
    Here nothing listens at --to: a usage error must come before the connection."""
    src = write_random(tmp_path / "src", 4096)
    args = ["send", str(src), "--to", closed_uri(), *argv]
    if "--timeout" not in argv and "MULTIFD_TIMEOUT" not in env:
        args += ["--timeout", "1"]
    d = procs.start(args, env).done(10)
    error_line(d, 2)


@pytest.mark.parametrize("value", ["nan", "inf", "2147484"])
def test_recv_timeout_nan_inf_or_huge(procs: Procs, tmp_path: Path, value: str) -> None:
    """`recv --timeout nan` exits 1 ("ValueError: cannot convert float NaN to
    integer"), inf exits 1 ("OverflowError: cannot convert float infinity to
    integer"), and any finite value of 2147484 s (~25 days) or more exits 1
    ("OverflowError: timeout is too large", from the selector's poll() in
    receiver._accept, whose timeout is an int32 of milliseconds).

    Either a usage error, or recv keeps listening as asked (then it is killed)."""
    p = procs.start(["recv", "--json", "--timeout", value, str(tmp_path / "dest")])
    d = p.done(3)
    if d.code is not None:
        error_line(d, 2)
    assert not (tmp_path / "dest").exists()


# -- the control socket -----------------------------------------------------------------------------


def test_control_set_huge_bandwidth_does_not_kill_the_migration(procs: Procs, tmp_path: Path,
                                                                short_dir: Path) -> None:
    """`multifd set --control SOCK max-bandwidth 1000...0` (400 digits) on a running
    send: the set command gets no answer (exit 3, "no answer from SOCK") and the
    running send dies with exit 1 ("internal error: OverflowError: cannot convert
    float infinity to integer"), and recv with it. ControlServer.serve_ready
    (control.py) catches ValueError and UsageError, not the OverflowError that
    parse_rate raises (config.parse_size). A bad request must never hurt the
    migration (control.py says so): the set is refused (exit 2), the send goes on."""
    src = write_random(tmp_path / "src", 8 * MiB, seed=3)
    dest = tmp_path / "dest"
    ctl = short_dir / "ctl.sock"
    recv, uri = procs.recv(dest, timeout="20")
    send = procs.start(["send", "--json", "--timeout", "20", str(src), "--to", uri,
                        "--max-bandwidth", "2M", "--control", f"unix:{ctl}"])
    deadline = time.monotonic() + 10
    while not ctl.exists():
        assert time.monotonic() < deadline and send.popen.poll() is None, "no control socket"
        time.sleep(0.05)
    bad = procs.start(["set", "--control", str(ctl), "max-bandwidth", HUGE]).done(20)
    # lift the limit so the rest of the copy is quick (if send still runs)
    subprocess.run([*MULTIFD, "set", "--control", str(ctl), "max-bandwidth", "0"],
                   capture_output=True, timeout=20)
    s, r = send.done(30), recv.done(30)
    assert s.code == 0, f"send exit {s.code}\n{s.err}"
    assert r.code == 0, f"recv exit {r.code}\n{r.err}"
    assert dest.read_bytes() == src.read_bytes()
    error_line(bad, 2)


def test_control_socket_path_too_long_says_why(procs: Procs, tmp_path: Path) -> None:
    """`--control unix:/tmp/<200 characters>`: "cannot listen on control socket
    /tmp/ccc...: None". ControlServer (control.py) formats e.strerror, which is
    None for Python's own "AF_UNIX path too long" OSError."""
    src = write_random(tmp_path / "src", 4096)
    ctl = "/tmp/" + "c" * 200
    d = procs.start(send_args(src, closed_uri(), "--control", f"unix:{ctl}")).done(20)
    msg = error_line(d, {2, 3})
    assert not msg.endswith("None") and "too long" in msg, msg
    assert not os.path.exists(ctl)


# -- files given as options -------------------------------------------------------------------------


def _unopenable_log(tmp_path: Path, kind: str) -> str:
    return {"missing-dir": str(tmp_path / "no" / "such" / "dir" / "log"),
            "procfs": "/proc/self/status",
            "sysfs": "/sys/kernel/multifd-bad-input-test.log"}[kind]


@pytest.mark.parametrize("side", ["send", "recv"])
@pytest.mark.parametrize("kind", ["missing-dir", "procfs", "sysfs"])
def test_unopenable_log_file(procs: Procs, tmp_path: Path, side: str, kind: str) -> None:
    """`--log-file DIR/missing/log` exits 1 ("internal error: FileNotFoundError"),
    /proc/self/status exits 1 ("OSError: [Errno 22] Invalid argument"), a new file
    in /sys exits 1 ("PermissionError"). logging.FileHandler(log_file) in
    logsetup.configure (logsetup.py) is not guarded. MULTIFD_LOG_FILE does the same."""
    log = _unopenable_log(tmp_path, kind)
    src = write_random(tmp_path / "src", 4096)
    if side == "send":
        args = send_args(src, closed_uri(), "--log-file", log)
    else:
        args = ["recv", "--timeout", "1", "--log-file", log, str(tmp_path / "dest")]
    d = procs.start(args).done(20)
    msg = error_line(d, {2, 7})
    assert "log" in msg, msg


@pytest.mark.parametrize("side", ["send", "recv"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_psk_file_that_is_not_a_regular_file(procs: Procs, tmp_path: Path, side: str,
                                             kind: str) -> None:
    """`--psk-file FIFO` blocks forever in open(); `--psk-file /dev/zero` reads
    without end (13 GB resident before it was killed, by hand). auth.load_psk
    (auth.py) does open(path).read() on whatever it is given. Here the process
    gets a 1 GiB address space, so /dev/zero ends in MemoryError: exit 1.
    Expected: refused as a usage error at once."""
    if kind == "fifo":
        key = tmp_path / "key.fifo"
        os.mkfifo(key)
    else:
        key = Path("/dev/zero")
    src = write_random(tmp_path / "src", 4096)
    if side == "send":
        args = send_args(src, closed_uri(), "--psk-file", str(key))
    else:
        args = ["recv", "--timeout", "1", "--psk-file", str(key), str(tmp_path / "dest")]
    d = procs.start(args, preexec=_limit_memory(1 << 30)).done(10)
    msg = error_line(d, 2)
    assert "--psk-file" in msg, msg


@pytest.mark.parametrize("ssh", [" ", 'ssh -o "unclosed'])
def test_bad_ssh_command(procs: Procs, tmp_path: Path, ssh: str) -> None:
    """`--ssh ' '` exits 1 ("IndexError: list index out of range") and
    `--ssh 'ssh -o "unclosed'` exits 1 ("ValueError: No closing quotation"):
    Orchestrator._start_remote (orchestrator.py) runs shlex.split(cfg.ssh) and
    takes [0], after the sources are open; the option is never validated."""
    src = write_random(tmp_path / "src", 4096)
    d = procs.start(send_args(src, "ssh:host.invalid:/tmp/dest", "--ssh", ssh)).done(20)
    msg = error_line(d, 2)
    assert "--ssh" in msg, msg


# -- sources -----------------------------------------------------------------------------------------


def test_fifo_source_does_not_hang(procs: Procs, tmp_path: Path) -> None:
    """`multifd send FIFO --to ...` never returns: open_source (sources.py) opens
    the path O_RDONLY before it looks at what it is, and opening a FIFO blocks
    until a writer comes. /dev/null and other character devices are refused with
    "neither a regular file nor a block device"; a FIFO must be too."""
    fifo = tmp_path / "src.fifo"
    os.mkfifo(fifo)
    d = procs.start(send_args(fifo, closed_uri())).done(10)
    msg = error_line(d, 2)
    assert str(fifo) in msg, msg


def test_procfs_source_is_not_silently_copied_empty(procs: Procs, tmp_path: Path) -> None:
    """`multifd send /proc/version`: exit 0, "verified and completed", and DEST is
    an empty file, although reading the source gives the kernel's version string.
    /proc files are S_ISREG with st_size 0 (sources.open_source trusts st_size).
    Either refuse such a source or copy what it holds, never report success for
    an empty copy."""
    src = Path("/proc/version")
    dest = tmp_path / "dest"
    recv, uri = procs.recv(dest)
    s = procs.start(send_args(src, uri, timeout="5")).done(30)
    recv.done(30)
    if s.code == 0:
        assert dest.read_bytes() == src.read_bytes(), (
            f"exit 0, but DEST holds {dest.stat().st_size} bytes of the source's "
            f"{len(src.read_bytes())}")
    else:
        error_line(s, {2, 7})
        assert not dest.exists()


def test_log_file_that_is_the_source(procs: Procs, tmp_path: Path) -> None:
    """`multifd send SRC --log-file SRC`: exit 0, the log lines are appended to the
    source while it is migrated, and the "verified" copy differs from the source
    (200000 bytes copied, 200176 in the source afterwards). multifd must not write
    into its own source: refuse the combination."""
    src = write_random(tmp_path / "src", 200_000, seed=5)
    before = src.read_bytes()
    recv, uri = procs.recv(tmp_path / "dest")
    s = procs.start(send_args(src, uri, "--log-file", str(src), timeout="5")).done(30)
    recv.kill()
    assert src.read_bytes() == before, "the source was modified"
    error_line(s, 2)


def test_recv_log_file_that_is_dest(procs: Procs, tmp_path: Path) -> None:
    """`multifd recv --log-file D D` (D does not exist): exit 2 with "destination D
    exists; use --force to replace it", which is wrong (multifd itself created
    it as the log), and an empty file is left at D, although no DEST may appear
    unless complete."""
    dest = tmp_path / "dest"
    d = procs.start(["recv", "--timeout", "1", "--log-file", str(dest), str(dest)]).done(20)
    msg = error_line(d, 2)
    assert "exists" not in msg, msg
    assert not dest.exists(), "a file appeared at DEST"


def test_huge_sparse_source_out_of_memory(procs: Procs, tmp_path: Path) -> None:
    """A 4 TiB sparse source (0 bytes allocated) to a file: image, with a 2 GiB
    address-space limit on send: exit 1, "internal error: OSError: [Errno 12]
    Cannot allocate memory". The page-hash table (8 bytes per 4 KiB page, 8 GiB
    here) is a memfd mapped by SharedTable._map (tables.py), called from
    SourceTables.create (tracker.py); nothing turns the failure into a clear
    error (e.g. "needs 8 GiB of page tables: use a larger --page-size")."""
    src = tmp_path / "sparse"
    try:
        with open(src, "wb") as f:
            f.truncate(4 << 40)
    except OSError as e:
        pytest.skip(f"cannot create a 4 TiB sparse file here: {e}")
    img = tmp_path / "img.mfd"
    d = procs.start(send_args(src, f"file:{img}"), preexec=_limit_memory(2 << 30)).done(30)
    if d.code == 0:  # managed within the limit: fine too
        return
    error_line(d, {2, 7})
    assert sorted(os.listdir(tmp_path)) == ["sparse"], os.listdir(tmp_path)


def test_source_with_a_non_utf8_name(procs: Procs, tmp_path: Path) -> None:
    """A source whose file name is not UTF-8 (b"\\xff\\xfe", legal on Linux): exit 1,
    "internal error: UnicodeEncodeError: 'utf-8' codec can't encode characters in
    position 0-1: surrogates not allowed" (ImageLayout.plan in image.py, and the
    block names of the wire protocol over tcp:, where recv exits 1 too). Either
    migrate it or refuse it as a usage error (SOURCE=NAME gives a UTF-8 name)."""
    src = tmp_path / os.fsdecode(b"\xff\xfe")
    write_random(src, 100_000, seed=11)
    d = procs.start(send_args(src, f"file:{tmp_path / 'img.mfd'}")).done(20)
    if d.code != 0:
        error_line(d, 2)


def test_dest_with_a_non_utf8_name(procs: Procs, tmp_path: Path) -> None:
    """`multifd recv DIR/b"u\\xff"`: exit 1 at once, "internal error:
    UnicodeEncodeError: ... surrogates not allowed": Destination.lock (sink.py) hashes
    os.path.realpath(DEST).encode() instead of os.fsencode(). Either listen as
    usual or refuse DEST as a usage error."""
    dest = tmp_path / os.fsdecode(b"u\xff")
    p = procs.start(["recv", "--json", "--timeout", "3", str(dest)])
    d = p.done(2)
    if d.code is not None:
        error_line(d, 2)
    else:
        assert json.loads(d.out.splitlines()[0])["event"] == "listening", d.out


# -- file: images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["same-path", "symlink"])
def test_image_over_the_source_is_refused(procs: Procs, tmp_path: Path, via: str) -> None:
    """`multifd send SRC --to file:SRC` exits 0 and the source is gone: the image is
    built under a hidden name and complete_image (image.py) renames it over
    IMAGE, which is the source (through a symlink too: _final_path resolves it).
    Nothing compares the image path with the sources."""
    src = write_random(tmp_path / "src", 100_000, seed=6)
    before = src.read_bytes()
    target = src
    if via == "symlink":
        target = tmp_path / "link"
        target.symlink_to(src)
    d = procs.start(send_args(src, f"file:{target}")).done(20)
    assert src.read_bytes() == before, f"exit {d.code}: the source was overwritten by the image"
    error_line(d, 2)


@pytest.mark.parametrize("kind", ["char-device", "fifo"])
def test_image_path_that_is_a_device_or_fifo(procs: Procs, tmp_path: Path, kind: str) -> None:
    """`multifd send SRC --to file:NODE`, NODE a character device or a FIFO: exit 0,
    and the node is replaced by a regular file (create_image in image.py refuses
    only a directory; complete_image renames over whatever is there). Found with
    --to file:/dev/full, which left /dev/full a 3 MiB regular file; here a node
    made in tmp_path (1,3 is the null device)."""
    node = tmp_path / "node"
    if kind == "fifo":
        os.mkfifo(node)
    else:
        try:
            os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as e:
            pytest.skip(f"cannot create a device node (needs root): {e}")
    mode = stat.S_IFMT(node.lstat().st_mode)
    src = write_random(tmp_path / "src", 100_000, seed=7)
    d = procs.start(send_args(src, f"file:{node}")).done(20)
    assert stat.S_IFMT(node.lstat().st_mode) == mode, f"exit {d.code}: the node was replaced"
    error_line(d, {2, 7})


# -- destinations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["/proc", "/sys"])
def test_dest_in_a_pseudo_filesystem(procs: Procs, tmp_path: Path, where: str) -> None:
    """`multifd recv /proc/NAME` (or /sys/NAME) with an empty source: both sides
    exit 1, recv with "internal error: FileNotFoundError: ... '/proc/.NAME.multifd-
    XXXXXXXX'" (PermissionError for /sys), send relays "peer aborted: destination:
    [Errno 2] ...". O_TMPFILE fails there, and the fallback open of a hidden name
    in Destination.create (sink.py) is not guarded. (With a non-empty source the
    free-space check stops it first, exit 7.)"""
    src = tmp_path / "empty"
    src.write_bytes(b"")
    dest = Path(where) / "multifd-bad-input-test"
    recv, uri = procs.recv(dest)
    s = procs.start(send_args(src, uri, timeout="5")).done(30)
    r = recv.done(30)
    error_line(r, {2, 7})
    error_line(s, {2, 7})


# -- state blobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "/", "."])
def test_bad_state_name_is_refused_before_the_migration(procs: Procs, tmp_path: Path,
                                                        name: str) -> None:
    """`--state-name ../evil` (or / or .) is not checked by send, although SOURCE=NAME
    is (sources.source_names runs check_block_name): the whole migration runs, the
    writer is paused, then recv refuses the name and both sides exit 4, "protocol
    error from the peer", for send's own bad option. The name must be refused as a
    usage error before anything is paused (orchestrator.py, where the blob is
    named and where "has the name of a source" is checked)."""
    src = write_random(tmp_path / "src", 100_000, seed=8)
    marker = tmp_path / "paused.marker"
    recv, uri = procs.recv(tmp_path / "dest")
    s = procs.start(send_args(src, uri, "--state-cmd", "echo state", "--state-name", name,
                              "--pause-cmd", f"touch {shlex.quote(str(marker))}",
                              "--resume-cmd", "true", timeout="5")).done(30)
    recv.kill()
    msg = error_line(s, 2)
    assert "--state-name" in msg or name in msg, msg
    assert not marker.exists(), "the writer was paused for an option that was bad from the start"
    assert not (tmp_path / "dest").exists()


# -- pausing send itself -----------------------------------------------------------------------------


def test_pause_pid_of_send_itself(procs: Procs, tmp_path: Path) -> None:
    """`--pause-pid` naming send's own process: send SIGSTOPs itself at the switchover
    and stays stopped (state T) for good; recv exits 3 after its --timeout, and the
    stopped send never exits (nothing can SIGCONT it: the watchdog acts only
    when main dies). PauseSpec.validate (pause.py) checks only that the pid exists."""
    src = write_random(tmp_path / "src", 100_000, seed=9)
    dest = tmp_path / "dest"
    recv, uri = procs.recv(dest)
    send = procs.start(send_args(src, uri, "--after-success", "resume", timeout="5"),
                       shell_wrap="exec {cmd} --pause-pid $$")
    s = send.done(10)
    recv.kill()
    msg = error_line(s, 2)
    assert "--pause-pid" in msg, msg
    assert not dest.exists()


def _cgroup2_dir() -> Path | None:
    """Our own cgroup v2 directory, if there is a writable one."""
    mount = None
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[2] == "cgroup2":
                mount = parts[1]
                break
    if mount is None:
        return None
    with open("/proc/self/cgroup") as f:
        rel = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
    if rel is None:
        return None
    d = Path(mount) / rel.lstrip("/")
    return d if os.access(d, os.W_OK) else None


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    base = _cgroup2_dir()
    if base is None:
        pytest.skip("no writable cgroup v2 here")
    cg = base / f"multifd-bad-input-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup: {e}")
    if not (cg / "cgroup.freeze").exists():
        cg.rmdir()
        pytest.skip("no cgroup.freeze (kernel older than 5.2)")
    try:
        yield cg
    finally:
        for _ in range(50):
            procs_in = (cg / "cgroup.procs").read_text().split()
            for pid in procs_in:  # processes the test itself moved there
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            (cg / "cgroup.freeze").write_text("0")
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_pause_cgroup_that_holds_send_itself(procs: Procs, tmp_path: Path,
                                             child_cgroup: Path) -> None:
    """`--pause-cgroup CG` where CG holds send itself (as when send runs inside the
    container it migrates): send freezes itself and its watchdog at the
    switchover and never exits; recv exits 3 after its --timeout.
    PauseSpec.validate (pause.py) checks only that CG has a cgroup.freeze."""
    src = write_random(tmp_path / "src", 100_000, seed=10)
    dest = tmp_path / "dest"
    recv, uri = procs.recv(dest)
    procs_file = shlex.quote(str(child_cgroup / "cgroup.procs"))
    send = procs.start(send_args(src, uri, "--after-success", "resume", timeout="5"),
                       shell_wrap=f"echo $$ > {procs_file} && exec {{cmd}} "
                                  f"--pause-cgroup {shlex.quote(str(child_cgroup))}")
    s = send.done(10, on_hang=lambda: (child_cgroup / "cgroup.freeze").write_text("0"))
    recv.kill()
    msg = error_line(s, 2)
    assert "--pause-cgroup" in msg, msg
    assert not dest.exists()


# -- stdout closed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["send", "recv"])
def test_json_with_stdout_closed(procs: Procs, tmp_path: Path, side: str) -> None:
    """`multifd recv --json DEST >&-` (stdout closed, as a daemon or a careless
    script starts it): a Python traceback and exit 1, "AttributeError: 'NoneType'
    object has no attribute 'write'". sys.stdout is None then, and Events
    (events.py) writes to it, catching only OSError; _exit (cli.py) then fails the
    same way while reporting that."""
    if side == "send":
        src = write_random(tmp_path / "src", 4096)
        args = ["send", "--json", "--timeout", "1", str(src), "--to", closed_uri()]
    else:
        args = ["recv", "--json", "--timeout", "1", str(tmp_path / "dest")]
    d = procs.start(args, shell_wrap="exec {cmd} >&-").done(20)
    error_line(d, 3)
