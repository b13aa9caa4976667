"""Live migration of a file that a real process keeps writing.

A writer (examples/writer.py, a separate process) dirties random pages while
`multifd send` migrates its file to a real `multifd recv`. These tests check
the switchover (pause mechanisms, keep-paused/resume, the final pass), the
convergence policy (--max-passes, --strict-downtime, --auto-converge,
--max-bandwidth), failures during the pause (the writer is resumed; the
watchdog resumes it even after SIGKILL of send), sources that grow or shrink
between passes, and the embedding API's dirty tracker.

Process states are read from /proc/PID/task/*/stat (field 3) for every thread:
"stopped" means every thread is in T, "running" means none is.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import xxhash
from helpers.mfdkit import (
    Migration,
    Proc,
    Runner,
    Writer,
    is_running,
    is_stopped,
    release,
    sha256,
    spawn,
    thread_states,
    wait_until,
    write_random,
)

KiB = 1 << 10
MiB = 1 << 20
PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).parent / "helpers"
TIMEOUT = ("--timeout", "20")  # short, so a hang fails instead of stalling the suite


# -- process states ----------------------------------------------------------------------------


@pytest.fixture
def stopped_sleeper() -> Iterator[int]:
    """A process the test stopped itself (SIGSTOP) before send starts."""
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)
    os.kill(p.pid, signal.SIGSTOP)
    assert wait_until(lambda: is_stopped(p.pid), 5) is not None
    yield p.pid
    release(p.pid)
    p.wait(10)


# -- migrations --------------------------------------------------------------------------------


def finish(p: Proc, timeout: float = 60.0) -> int:
    """Wait for exit; every stdout line must be one JSON event (nothing else on stdout)."""
    out, err = p.popen.communicate(timeout=timeout)
    p.stderr += err
    for line in out.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON event on stdout: {line!r}\nstdout:\n{out}") from None
        assert isinstance(ev, dict) and "event" in ev, line
        p.events.append(ev)
    return p.popen.returncode


def describe(m: Migration) -> str:
    def short(p: Proc) -> str:
        evs = [{k: v for k, v in e.items() if k not in ("side", "ts")} for e in p.events]
        return f"events={evs}\nstderr={p.stderr[-3000:]}"

    return f"SEND {short(m.send)}\nRECV {short(m.recv)}"


def migrate(runner: Runner, src: Path, dest: Path, *send_args: str,
            send_env: dict[str, str] | None = None,
            recv_env: dict[str, str] | None = None) -> Migration:
    return runner.migrate(src, dest, send_args=(*TIMEOUT, *send_args), recv_args=TIMEOUT,
                          send_env=send_env, recv_env=recv_env)


def finish_both(m: Migration, timeout: float = 90.0) -> tuple[int, int]:
    s = finish(m.send, timeout)
    r = finish(m.recv, timeout)
    return s, r


def completed_ok(m: Migration, timeout: float = 90.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sides exit 0 with one completed event each, and their digests agree."""
    s, r = finish_both(m, timeout)
    assert (s, r) == (0, 0), describe(m)
    sc, rc = m.send.of("completed"), m.recv.of("completed")
    assert len(sc) == 1 and len(rc) == 1, describe(m)
    assert m.send.last() is sc[0] and m.recv.last() is rc[0]
    assert sc[0]["digest"] and sc[0]["digest"] == rc[0]["digest"], describe(m)
    assert sc[0]["passes"] == rc[0]["passes"]
    return sc[0], rc[0]


def failed_with(m_side: Proc, code: int) -> dict[str, Any]:
    ev = m_side.last()
    assert ev["event"] == "failed" and ev["exit_code"] == code, m_side.events
    assert not m_side.of("completed")
    return ev


def file_digest(path: Path, page_size: int = PAGE) -> str:
    """The migration digest computed from a file alone: xxh3-128 over the size and the
    xxh3-64 of every page (the last one short), as multifd's tables.table_digest."""
    size = path.stat().st_size
    h = xxhash.xxh3_128()
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        while page := f.read(page_size):
            h.update(xxhash.xxh3_64_intdigest(page).to_bytes(8, "little"))
    return h.hexdigest()


def check_pass_events(p: Proc, paused: bool) -> list[dict[str, Any]]:
    """Pass numbers 1..N in order; with a pause exactly the last is final and a switchover
    event comes right before it; completed comes last."""
    events = p.events
    names = [e["event"] for e in events]
    passes = p.of("pass")
    done = p.last()
    assert done["event"] == "completed"
    assert [e["pass"] for e in passes] == list(range(1, done["passes"] + 1)), passes
    assert [e["final"] for e in passes] == [False] * (len(passes) - 1) + [paused], passes
    if paused:
        assert names.count("switchover") == 1, names
        sw = names.index("switchover")
        assert sw < names.index("completed")
        # The final pass is the first pass event after the switchover (other events,
        # such as progress, may come in between).
        after = [e for e in events[sw + 1:] if e["event"] == "pass"]
        assert after == [passes[-1]], names
        assert events[sw]["pass"] == passes[-1]["pass"]
    else:
        assert "switchover" not in names
    return passes


def hook(script: str, *args: object) -> str:
    """A MULTIFD_TEST_BETWEEN_PASSES command running one of tests/helpers."""
    return shlex.join([sys.executable, str(HELPERS / script), *map(str, args)])


def sh(*words: object) -> str:
    return shlex.join(map(str, words))


# -- 1-3. --pause-pid ---------------------------------------------------------------------------


def test_pause_pid_keeps_writer_stopped(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 64 * MiB, seed=1)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="16M")
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid))
    sc, rc = completed_ok(m)
    # keep-paused is the default: the writer is still stopped, every thread of it.
    states = w.states()
    assert len(states) == 2 and all(s == "T" for s in states), states
    assert sc["paused"] is True
    assert sc["passes"] >= 2
    assert isinstance(sc["downtime_ms"], (int, float)) and sc["downtime_ms"] > 0, sc
    assert sc["downtime_ms"] <= sc["total_time_ms"]
    check_pass_events(m.send, paused=True)
    # The source is frozen, so DEST must be exactly it.
    assert sha256(dest) == sha256(src)
    assert file_digest(dest) == sc["digest"]
    assert dest.stat().st_size == src.stat().st_size
    # Pass 1 sent the whole file, and the writer kept pass 2 busy.
    passes = m.send.of("pass")
    assert passes[0]["dirty_bytes"] == 64 * MiB
    assert passes[1]["dirty_bytes"] > 0


def test_after_success_resume(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 32 * MiB, seed=2)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="16M")
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid), "--after-success", "resume")
    sc, rc = completed_ok(m)
    assert wait_until(w.running, 0.5) is not None, w.states()
    assert sc["paused"] is True
    check_pass_events(m.send, paused=True)
    # The source moved on, but DEST is what both sides' page tables describe.
    assert file_digest(dest) == sc["digest"] == rc["digest"]
    # And the writer really runs: the source keeps changing.
    before = sha256(src)
    time.sleep(0.2)
    assert sha256(src) != before


def test_after_success_resume_dest_is_the_snapshot(runner: Runner, tmp_path: Path,
                                                   writers: Any) -> None:
    """The pause command itself stops the writer and snapshots the source: DEST must
    equal the snapshot byte for byte, and the writer runs again afterwards."""
    src = write_random(tmp_path / "src", 32 * MiB, seed=3)
    dest, snap = tmp_path / "dest", tmp_path / "snapshot"
    w = writers(src, rate="16M", hot="16M")
    m = migrate(runner, src, dest,
                "--pause-cmd", hook("stop_and_snapshot.py", w.pid, src, snap),
                "--resume-cmd", sh("kill", "-CONT", w.pid),
                "--after-success", "resume")
    sc, _ = completed_ok(m)
    assert wait_until(w.running, 0.5) is not None, w.states()
    assert sha256(dest) == sha256(snap)
    # The helper prints on stdout and stderr; none of it reached send's stdout
    # (finish() parsed every line), and its output went to the log.
    assert "stop_and_snapshot: stopping" in m.send.stderr
    check_pass_events(m.send, paused=True)


def test_pause_pid_stops_every_thread(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 32 * MiB, seed=4)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="16M", threads=2)
    assert len(w.states()) == 3  # main + two writing threads
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid))
    sc, _ = completed_ok(m)
    states = w.states()
    assert len(states) == 3 and all(s == "T" for s in states), states
    assert sha256(dest) == sha256(src)
    check_pass_events(m.send, paused=True)


@pytest.mark.slow
def test_pause_pid_heavy(runner: Runner, tmp_path: Path, writers: Any) -> None:
    """256 MiB, four writing threads, four channels, lz4."""
    src = write_random(tmp_path / "src", 256 * MiB, seed=26)
    dest = tmp_path / "dest"
    w = writers(src, rate="32M", hot="64M", threads=4)
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid), "--channels", "4",
                "--compress", "lz4")
    sc, _ = completed_ok(m, timeout=180)
    states = w.states()
    assert len(states) == 5 and all(s == "T" for s in states), states
    assert sha256(dest) == sha256(src)
    assert file_digest(dest) == sc["digest"]
    check_pass_events(m.send, paused=True)


# -- 4. --pause-cmd / --resume-cmd ---------------------------------------------------------------


def test_pause_cmd_and_resume_cmd(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 32 * MiB, seed=5)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="16M")
    log = tmp_path / "cmd.log"
    pause = f"echo pausing-now; echo to-stderr >&2; echo pause >> {log}; kill -STOP {w.pid}"
    resume = f"echo resuming-now; echo resume >> {log}; kill -CONT {w.pid}"
    m = migrate(runner, src, dest, "--pause-cmd", pause, "--resume-cmd", resume,
                "--after-success", "resume")
    sc, rc = completed_ok(m)
    assert wait_until(w.running, 0.5) is not None, w.states()
    assert log.read_text().split() == ["pause", "resume"]
    assert sc["paused"] is True
    check_pass_events(m.send, paused=True)
    assert file_digest(dest) == sc["digest"]
    # The commands' output went to the log (stderr), never to stdout.
    for text in ("pausing-now", "to-stderr", "resuming-now"):
        assert text in m.send.stderr, m.send.stderr
        assert not any(text in json.dumps(e) for e in m.send.events)


def test_pause_cmd_failure_exits_8(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 16 * MiB, seed=6)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="8M")
    m = migrate(runner, src, dest, "--pause-cmd", "echo refusing; exit 1",
                "--resume-cmd", sh("kill", "-CONT", w.pid))
    s, r = finish_both(m)
    assert s == 8, describe(m)
    ev = failed_with(m.send, 8)
    assert "pause command" in ev["error"]
    assert r == 8, describe(m)  # recv exits with the code the source reported
    assert wait_until(w.running, 0.5) is not None, w.states()
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_pause_cmd_that_stops_then_fails_leaves_writer_running(
        runner: Runner, tmp_path: Path, writers: Any) -> None:
    """A pause command that paused part of the way and then failed (as `fsfreeze` of a
    second mount can): send exits 8, and the writer must not be left stopped (README:
    "On any failure ... the writer is always resumed before send exits")."""
    src = write_random(tmp_path / "src", 16 * MiB, seed=7)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="8M")
    m = migrate(runner, src, dest, "--pause-cmd", f"kill -STOP {w.pid}; exit 1",
                "--resume-cmd", sh("kill", "-CONT", w.pid))
    s, r = finish_both(m)
    assert s == 8, describe(m)
    failed_with(m.send, 8)
    assert not dest.exists()
    assert wait_until(w.running, 2.0) is not None, f"writer left stopped: {w.states()}"


@pytest.mark.parametrize("given", ["--pause-cmd", "--resume-cmd"])
def test_pause_cmd_needs_resume_cmd(tmp_path: Path, given: str) -> None:
    src = write_random(tmp_path / "src", 64 * KiB)
    p = spawn(["send", "--json", str(src), "--to", "tcp:127.0.0.1:9", given, "true"])
    assert finish(p, 30) == 2
    ev = failed_with(p, 2)
    assert "--pause-cmd" in ev["error"] and "--resume-cmd" in ev["error"]
    assert len(p.events) == 1


def test_auto_converge_needs_a_pid_or_cgroup(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 64 * KiB)
    p = spawn(["send", "--json", str(src), "--to", "tcp:127.0.0.1:9", "--auto-converge",
               "--pause-cmd", "true", "--resume-cmd", "true"])
    assert finish(p, 30) == 2
    failed_with(p, 2)


# -- 5. the embedding API's dirty log ------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "hot", "nthreads"),
    [(32 * MiB, 8 * MiB, 1),
     pytest.param(128 * MiB, 32 * MiB, 4, marks=pytest.mark.slow)],
)
def test_api_tracker(runner: Runner, tmp_path: Path, size: int, hot: int,
                     nthreads: int) -> None:
    from multifd_cli.api import LiveMigration

    src = write_random(tmp_path / "src", size, seed=8)
    dest = tmp_path / "dest"
    recv, uri = runner.recv(dest, *TIMEOUT)

    lock = threading.Lock()  # held by the writer around each write, by pause() until resume()
    stop = threading.Event()
    writes = [0] * nthreads
    calls: list[str] = []
    events: list[dict[str, Any]] = []
    error: list[BaseException] = []

    def pause() -> None:
        calls.append("pause")
        lock.acquire()  # returns once no write is in progress; none can start

    def resume() -> None:
        calls.append("resume")
        lock.release()

    mig = LiveMigration(str(src), uri, pause=pause, resume=resume, timeout=20,
                        on_event=events.append)

    def write_loop(k: int) -> None:
        rng = random.Random(8 + k)
        fd = os.open(src, os.O_WRONLY)
        try:
            while not stop.is_set():
                with lock:
                    if stop.is_set():
                        break
                    off = rng.randrange(hot // PAGE) * PAGE
                    os.pwrite(fd, rng.randbytes(PAGE), off)
                    mig.mark_dirty(off, PAGE)
                    writes[k] += 1
                time.sleep(0.0005)  # about 8 MiB/s
        except BaseException as e:  # noqa: BLE001 - reported by the test
            error.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write_loop, args=(k,), daemon=True)
               for k in range(nthreads)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        summary = mig.run()
        # keep-paused: the writer is still blocked, so the source is frozen.
        assert calls == ["pause"]
        assert finish(recv, 30) == 0, recv.stderr
        assert sha256(dest) == sha256(src)
        assert file_digest(dest) == summary["digest"] == recv.last()["digest"]
        total_writes = sum(writes)
    finally:
        stop.set()
        if calls and calls[-1] == "pause":
            lock.release()
        for t in threads:
            t.join(10)
    assert not error, error
    assert summary["paused"] is True
    passes = [e for e in events if e["event"] == "pass"]
    assert [e["pass"] for e in passes] == list(range(1, summary["passes"] + 1))
    assert summary["passes"] >= 2 and passes[-1]["final"]
    assert [e["event"] for e in events].count("switchover") == 1
    assert passes[0]["sent_bytes"] >= size
    # Later passes send what the application marked, not the file: pass 2 far below
    # the size, and all later passes together at most what was written (+ headers).
    assert 0 < passes[1]["sent_bytes"] < size // 8, passes[1]
    later = sum(e["sent_bytes"] for e in passes[1:])
    assert later <= total_writes * PAGE * 1.02 + 16 * KiB * len(passes), (later, total_writes)


# -- 6. a writer faster than the link ------------------------------------------------------------

FAST = dict(rate="40M", hot="32M")
CAP = ("--max-bandwidth", "20M")


def test_auto_converge_throttles_until_it_converges(runner: Runner, tmp_path: Path,
                                                     writers: Any) -> None:
    src = write_random(tmp_path / "src", 64 * MiB, seed=10)
    dest = tmp_path / "dest"
    w = writers(src, **FAST)
    m = migrate(runner, src, dest, *CAP, "--auto-converge", "--pause-pid", str(w.pid))
    sc, _ = completed_ok(m, timeout=120)
    passes = check_pass_events(m.send, paused=True)
    pcts = [e["throttle_pct"] for e in passes]
    assert max(pcts) > 0, pcts
    assert pcts == sorted(pcts), pcts  # the throttle only ever tightens
    assert w.stopped()
    assert sha256(dest) == sha256(src)
    # It switched over because it converged, not because it ran out of passes.
    assert sc["passes"] < 30, passes
    last = passes[-2]
    assert last["expected_downtime_ms"] is not None and last["expected_downtime_ms"] <= 300, last


def test_fast_writer_without_pause_does_not_converge(runner: Runner, tmp_path: Path,
                                                     writers: Any) -> None:
    src = write_random(tmp_path / "src", 64 * MiB, seed=11)
    dest = tmp_path / "dest"
    w = writers(src, **FAST)
    m = migrate(runner, src, dest, *CAP, "--max-passes", "3")
    s, r = finish_both(m)
    assert s == 9, describe(m)
    ev = failed_with(m.send, 9)
    assert "--max-passes" in ev["error"] and "3 passes" in ev["error"], ev
    assert len(m.send.of("pass")) == 3
    assert "switchover" not in [e["event"] for e in m.send.events]
    assert r == 9, describe(m)
    assert not dest.exists()
    assert w.running(), w.states()


def test_strict_downtime_exits_9_and_writer_runs(runner: Runner, tmp_path: Path,
                                                 writers: Any) -> None:
    src = write_random(tmp_path / "src", 64 * MiB, seed=12)
    dest = tmp_path / "dest"
    w = writers(src, **FAST)
    m = migrate(runner, src, dest, *CAP, "--pause-pid", str(w.pid), "--max-passes", "3",
                "--strict-downtime", "--downtime-limit", "1")
    s, r = finish_both(m)
    assert s == 9, describe(m)
    ev = failed_with(m.send, 9)
    assert "--strict-downtime" in ev["error"], ev
    assert len(m.send.of("pass")) == 3
    assert "switchover" not in [e["event"] for e in m.send.events]
    assert r == 9
    assert not dest.exists()
    assert wait_until(w.running, 0.5) is not None, w.states()


def test_max_passes_forces_switchover(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 64 * MiB, seed=13)
    dest = tmp_path / "dest"
    w = writers(src, **FAST)
    m = migrate(runner, src, dest, *CAP, "--pause-pid", str(w.pid), "--max-passes", "3",
                "--downtime-limit", "1")
    sc, _ = completed_ok(m)
    passes = check_pass_events(m.send, paused=True)
    assert sc["passes"] == 4, passes  # three passes, then the forced final one
    assert "--max-passes" in m.send.stderr  # the warning says why it switched over anyway
    assert w.stopped()
    assert sha256(dest) == sha256(src)
    # --max-bandwidth is lifted during the downtime: the final pass (tens of MiB)
    # runs well above the 20 MiB/s cap that pass 1 ran at.
    final = passes[-1]
    assert final["sent_bytes"] > 8 * MiB, final
    assert final["sent_bytes"] / (final["duration_ms"] / 1000) > 40 * MiB, final
    assert passes[0]["duration_ms"] > 2500, passes[0]  # 64 MiB at 20 MiB/s


def test_passes_that_stop_improving_the_downtime_end_in_a_switchover(
        runner: Runner, tmp_path: Path, writers: Any) -> None:
    """A limit no pass can reach (1 ms) and a writer the capped link cannot outrun:
    once the expected downtime stops improving by 10 % for 3 passes, send switches
    over with a warning that names what bounds it, instead of running all 30
    --max-passes. (Without the rule this run takes 30 passes.)"""
    src = write_random(tmp_path / "src", 64 * MiB, seed=14)
    dest = tmp_path / "dest"
    w = writers(src, **FAST)
    m = migrate(runner, src, dest, *CAP, "--pause-pid", str(w.pid), "--downtime-limit", "1")
    sc, _ = completed_ok(m)
    passes = check_pass_events(m.send, paused=True)
    assert sc["passes"] <= 8, [(p["pass"], p["expected_downtime_ms"]) for p in passes]
    assert "stopped improving" in m.send.stderr, m.send.stderr
    assert "--max-passes" not in m.send.stderr
    assert w.stopped()
    assert sha256(dest) == sha256(src)
    # The decision: none of the three estimates before the switchover was a 10 %
    # gain on the lowest estimate before it.
    est = [p["expected_downtime_ms"] for p in passes[:-1] if p["expected_downtime_ms"]]
    assert len(est) >= 4, est
    assert all(est[i] >= 0.9 * min(est[:i]) for i in range(len(est) - 3, len(est))), est


def test_auto_converge_does_not_hide_a_stall_it_cannot_fix(
        runner: Runner, tmp_path: Path, writers: Any) -> None:
    """A slow writer and an unreachable limit: what bounds the downtime is the scan
    and the sync, which throttling cannot shrink, so --auto-converge must not keep
    the stall rule from switching over (it once waited for --max-passes)."""
    src = write_random(tmp_path / "src", 32 * MiB, seed=16)
    dest = tmp_path / "dest"
    w = writers(src, rate="1M", hot="1M")
    # The hash tracker: its scan of the whole source is the stall (the kernel tracker
    # reads only what a 1 MiB/s writer wrote, and can get under 1 ms).
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid), "--downtime-limit", "1",
                "--auto-converge", "--max-passes", "20", "--tracker", "hash")
    sc, _ = completed_ok(m)
    assert "stopped improving" in m.send.stderr, m.send.stderr
    assert "--max-passes" not in m.send.stderr
    assert sc["passes"] < 20
    assert sha256(dest) == sha256(src)


def test_strict_downtime_exits_9_once_passes_stop_improving(
        runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 64 * MiB, seed=15)
    dest = tmp_path / "dest"
    w = writers(src, **FAST)
    m = migrate(runner, src, dest, *CAP, "--pause-pid", str(w.pid), "--downtime-limit", "1",
                "--strict-downtime")
    s, r = finish_both(m)
    assert s == 9, describe(m)
    ev = failed_with(m.send, 9)
    assert "stopped improving" in ev["error"] and "--strict-downtime" in ev["error"], ev
    assert len(m.send.of("pass")) <= 8
    assert r == 9
    assert not dest.exists()
    assert wait_until(w.running, 0.5) is not None, w.states()


# -- 7. the destination dies during the pause ----------------------------------------------------

# A final pass that surely has data and surely is slow, so a test can act during the
# pause: pass 2's expected downtime is always within 100 s, so the switchover follows
# pass 2 and the final pass is epoch 3, where recv's channel 0 takes 1 s per packet.
# --max-bandwidth (lifted only at the pause) makes pass 2 last long enough for the
# writer (ticks of 10 ms) to dirty pages that only the final pass can send.
PAUSABLE_SIZE = 4 * MiB
PAUSABLE_WRITER = dict(rate="16M", hot="2M")
SLOW_FINAL = {"MULTIFD_TEST_DELAY": "0:1.0:3"}
SWITCH_AFTER_2 = ("--channels", "1", "--downtime-limit", "100000", "--max-bandwidth", "4M")


@pytest.mark.parametrize("mechanism", ["pause-cmd", "pause-pid"])
def test_recv_killed_during_pause(runner: Runner, tmp_path: Path, writers: Any,
                                  mechanism: str) -> None:
    src = write_random(tmp_path / "src", PAUSABLE_SIZE, seed=14)
    dest = tmp_path / "dest"
    marker = tmp_path / "paused-marker"
    w = writers(src, **PAUSABLE_WRITER)
    if mechanism == "pause-cmd":
        pause = ("--pause-cmd", f"kill -STOP {w.pid}; touch {marker}",
                 "--resume-cmd", f"kill -CONT {w.pid}")
        is_paused: Callable[[], bool] = marker.exists
    else:
        pause = ("--pause-pid", str(w.pid))
        is_paused = w.stopped  # nothing else stops this writer
    m = migrate(runner, src, dest, *SWITCH_AFTER_2, *pause, recv_env=SLOW_FINAL)
    assert wait_until(is_paused, 30, 0.002) is not None, f"never paused: {why(m)}"
    assert wait_until(w.stopped, 2) is not None
    os.killpg(m.recv.popen.pid, signal.SIGKILL)
    m.recv.popen.wait(10)
    s = finish(m.send, 30)
    exited = time.monotonic()
    assert s in (3, 4), describe(m)
    failed_with(m.send, s)
    assert "switchover" in [e["event"] for e in m.send.events]
    took = wait_until(w.running, 2.0)
    assert took is not None, f"writer still stopped 2 s after send exited: {w.states()}"
    assert time.monotonic() - exited <= 2.0
    assert not dest.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("dest")]


# -- 8. send's main process dies during the pause ------------------------------------------------


def _kill_main_and_time_resume(m: Migration, w: Writer) -> float:
    """SIGKILL only send's main process; seconds until the writer runs again."""
    os.kill(m.send.popen.pid, signal.SIGKILL)
    killed = time.monotonic()
    rc = m.send.popen.wait(10)
    if rc != -signal.SIGKILL:
        raise AssertionError(f"test setup: send exited {rc} before the kill landed\n{why(m)}")
    took = wait_until(w.running, 5.0)
    assert took is not None, f"writer still stopped 5 s after SIGKILL of send: {w.states()}"
    return time.monotonic() - killed


def why(m: Migration) -> str:
    """What send said, if it has exited."""
    if m.send.popen.poll() is None:
        return "send is still running"
    finish(m.send, 10)
    return describe(m)


def _reap_group(m: Migration) -> None:
    """Channels of a SIGKILLed main may linger in its process group."""
    for p in (m.send, m.recv):
        try:
            os.killpg(p.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_of_send_during_pause_cmd(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", PAUSABLE_SIZE, seed=15)
    dest = tmp_path / "dest"
    marker = tmp_path / "paused-marker"
    w = writers(src, **PAUSABLE_WRITER)
    m = migrate(runner, src, dest, *SWITCH_AFTER_2,
                "--pause-cmd", f"kill -STOP {w.pid}; touch {marker}",
                "--resume-cmd", f"kill -CONT {w.pid}",
                recv_env=SLOW_FINAL)
    try:
        assert wait_until(marker.exists, 30, 0.002) is not None, f"never paused: {why(m)}"
        assert w.stopped()
        elapsed = _kill_main_and_time_resume(m, w)
        assert elapsed <= 2.5, elapsed
    finally:
        _reap_group(m)
    assert not dest.exists()


def test_sigkill_of_send_during_pause_pid(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", PAUSABLE_SIZE, seed=16)
    dest = tmp_path / "dest"
    w = writers(src, **PAUSABLE_WRITER)
    m = migrate(runner, src, dest, *SWITCH_AFTER_2, "--pause-pid", str(w.pid),
                recv_env=SLOW_FINAL)
    try:
        # Nothing else stops this writer: state T means the switchover paused it.
        assert wait_until(w.stopped, 30, 0.002) is not None, f"never paused: {why(m)}"
        assert m.send.popen.poll() is None
        elapsed = _kill_main_and_time_resume(m, w)
        assert elapsed <= 2.5, elapsed
    finally:
        _reap_group(m)
    assert not dest.exists()


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(5))
def test_sigkill_of_send_during_pause_pid_repeated(runner: Runner, tmp_path: Path,
                                                   writers: Any, round_: int) -> None:
    """The 2 s bound, again and again, with two writing threads and two channels."""
    src = write_random(tmp_path / "src", PAUSABLE_SIZE, seed=40 + round_)
    dest = tmp_path / "dest"
    w = writers(src, **PAUSABLE_WRITER, threads=2)
    m = migrate(runner, src, dest, "--downtime-limit", "100000", "--max-bandwidth", "4M",
                "--pause-pid", str(w.pid), recv_env={"MULTIFD_TEST_DELAY": "1:1.0:3"})
    try:
        assert wait_until(w.stopped, 30, 0.002) is not None, f"never paused: {why(m)}"
        time.sleep(0.1 * round_)  # land at different points of the final pass
        elapsed = _kill_main_and_time_resume(m, w)
        assert elapsed <= 2.5, elapsed
    finally:
        _reap_group(m)


def test_sigterm_of_send_during_pause(runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", PAUSABLE_SIZE, seed=17)
    dest = tmp_path / "dest"
    w = writers(src, **PAUSABLE_WRITER)
    m = migrate(runner, src, dest, *SWITCH_AFTER_2, "--pause-pid", str(w.pid),
                recv_env=SLOW_FINAL)
    assert wait_until(w.stopped, 30, 0.002) is not None, f"never paused: {why(m)}"
    os.kill(m.send.popen.pid, signal.SIGTERM)
    s = finish(m.send, 30)
    assert s == 143, describe(m)
    failed_with(m.send, 143)
    assert w.running(), w.states()  # resumed before send exited
    r = finish(m.recv, 30)
    assert r != 0
    assert not dest.exists()


def test_sigkill_of_send_while_throttling(runner: Runner, tmp_path: Path,
                                          writers: Any) -> None:
    """--auto-converge stops the writer for part of every 100 ms. SIGKILL of send in
    that part must not leave it stopped either (README: "a watchdog resumes it within
    2 s even if send itself is killed with SIGKILL")."""
    src = write_random(tmp_path / "src", 16 * MiB, seed=18)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="8M")
    # Never switch over (limit 1 ms), so state T can only come from the throttle.
    m = migrate(runner, src, dest, "--max-bandwidth", "8M", "--auto-converge",
                "--pause-pid", str(w.pid), "--downtime-limit", "1")
    try:
        assert wait_until(w.stopped, 40, 0.0005) is not None, "never throttled"
        os.kill(m.send.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        if not w.stopped():
            pytest.skip("the throttle's stop phase ended before the kill landed")
        m.send.popen.wait(10)
        took = wait_until(w.running, 3.0)
        assert took is not None, (
            f"writer still stopped {time.monotonic() - killed:.1f} s after SIGKILL of send "
            f"during a throttle stop phase: {w.states()}"
        )
        assert time.monotonic() - killed <= 2.5
    finally:
        _reap_group(m)


# Main dies right after the throttle's first SIGSTOP: the earliest moment a kill can
# strand the writer. The CI once caught the end-to-end test above in that window.
_DIE_AFTER_FIRST_STOP = r"""
import os, signal, sys
from multifd_cli.writer import pause, throttle, watchdog as wd
target = int(sys.argv[1])
spec = pause.PauseSpec(pids=(target,))
watchdog = wd.Watchdog(spec)
real_kill = os.kill
def kill(pid, sig):
    real_kill(pid, sig)
    if pid == target and sig == signal.SIGSTOP:
        real_kill(os.getpid(), signal.SIGKILL)
os.kill = kill
throttle.Throttle(spec, watchdog).step()
signal.pause()
"""


def test_sigkill_right_after_the_first_throttle_stop(sleeper: int) -> None:
    p = subprocess.run([sys.executable, "-c", _DIE_AFTER_FIRST_STOP, str(sleeper)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    took = wait_until(lambda: is_running(sleeper), 3.0)
    assert took is not None, f"writer left stopped: {thread_states(sleeper)}"
    assert took <= 2.5


# -- 9. a source that grows or shrinks between passes --------------------------------------------

RESIZES = {
    "grow": (3 * MiB, 5 * MiB + 1234),
    "shrink": (3 * MiB + 777, MiB + 4097),
    "shrink-to-page": (3 * MiB, 64 * KiB),
    "grow-from-tiny": (1000, 2 * MiB + 5),
}


@pytest.mark.parametrize("case", list(RESIZES))
def test_resized_source(runner: Runner, tmp_path: Path, case: str) -> None:
    old, new = RESIZES[case]
    src = write_random(tmp_path / "src", old, seed=19)
    dest = tmp_path / "dest"
    marker = tmp_path / "resized"
    m = migrate(runner, src, dest, "--no-mtime-shortcut",
                send_env={"MULTIFD_TEST_BETWEEN_PASSES":
                          hook("resize_once.py", src, marker, new, 20)})
    sc, rc = completed_ok(m)
    assert marker.exists()
    assert src.stat().st_size == new
    assert dest.stat().st_size == new
    assert sha256(dest) == sha256(src)
    assert file_digest(dest) == sc["digest"]
    assert sc["passes"] >= 2
    check_pass_events(m.send, paused=False)


@pytest.mark.parametrize("case", ["grow", "shrink"])
def test_resized_source_with_live_writer(runner: Runner, tmp_path: Path, writers: Any,
                                         case: str) -> None:
    old = 16 * MiB
    new = 24 * MiB + 1234 if case == "grow" else 8 * MiB + 1234
    src = write_random(tmp_path / "src", old, seed=21)
    dest = tmp_path / "dest"
    marker = tmp_path / "resized"
    w = writers(src, rate="8M", hot="4M")  # stays inside the shrunken file
    m = migrate(runner, src, dest, "--no-mtime-shortcut", "--pause-pid", str(w.pid),
                send_env={"MULTIFD_TEST_BETWEEN_PASSES":
                          hook("resize_once.py", src, marker, new, 22)})
    sc, _ = completed_ok(m)
    assert marker.exists()
    assert w.stopped()
    assert src.stat().st_size == new == dest.stat().st_size
    assert sha256(dest) == sha256(src)
    check_pass_events(m.send, paused=True)


# -- 10. a process somebody else stopped stays stopped --------------------------------------------


def test_already_stopped_process_stays_stopped_after_success(
        runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 16 * MiB, seed=23)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="8M")
    os.kill(w.pid, signal.SIGSTOP)
    assert wait_until(w.stopped, 5) is not None
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid), "--after-success", "resume")
    completed_ok(m)
    time.sleep(0.1)
    assert w.stopped(), w.states()
    assert sha256(dest) == sha256(src)
    assert "already stopped" in m.send.stderr


def test_already_stopped_process_stays_stopped_after_failure(
        runner: Runner, tmp_path: Path, writers: Any) -> None:
    src = write_random(tmp_path / "src", 16 * MiB, seed=24)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="8M")
    os.kill(w.pid, signal.SIGSTOP)
    assert wait_until(w.stopped, 5) is not None
    m = migrate(runner, src, dest, "--pause-pid", str(w.pid),
                "--pause-cmd", "exit 1", "--resume-cmd", "true")
    s, _ = finish_both(m)
    assert s == 8, describe(m)
    time.sleep(0.1)
    assert w.stopped(), w.states()
    assert not dest.exists()


def test_already_stopped_process_is_not_continued_by_the_throttle(
        runner: Runner, tmp_path: Path, writers: Any, stopped_sleeper: int) -> None:
    """Two --pause-pid: a fast writer that auto-converge throttles, and a process
    somebody else stopped. README: "A process that was already stopped is never
    continued" -- not by the throttle's SIGCONT either."""
    src = write_random(tmp_path / "src", 16 * MiB, seed=25)
    dest = tmp_path / "dest"
    w = writers(src, rate="16M", hot="8M")
    m = migrate(runner, src, dest, "--max-bandwidth", "8M", "--auto-converge",
                "--pause-pid", str(w.pid), "--pause-pid", str(stopped_sleeper),
                "--max-passes", "7", "--downtime-limit", "1", "--after-success", "resume")
    seen: list[list[str]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            s = thread_states(stopped_sleeper)
            if not (s and all(c in "Tt" for c in s)):
                seen.append(s)
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        sc, _ = completed_ok(m)
    finally:
        done.set()
        t.join(5)
    passes = m.send.of("pass")
    assert max(e["throttle_pct"] for e in passes) > 0, passes  # the throttle did run
    assert wait_until(w.running, 0.5) is not None
    end = thread_states(stopped_sleeper)
    assert not seen, (
        f"the stopped process ran: seen not stopped {len(seen)} times (e.g. {seen[0]}); "
        f"state after send exited: {end}"
    )
    assert is_stopped(stopped_sleeper), end
