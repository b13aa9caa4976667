"""qemu: multifd against QEMU's own multifd migration of paused TCG guests, with a
small QMP client to drive them.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from harness import BenchError, MiB, Sample
from harness.procs import Proc, free_port, unlink, wait_listening
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate, naive_copy, rss_text
from harness.stats import human_size, med, ratio, secs, spread

QEMU = "qemu-system-x86_64"


QEMU_HINT = "apt-get update && apt-get install -y qemu-system-x86"


QEMU_LOAD_ADDR = 256 * MiB  # the data file goes into guest RAM here, above the BIOS areas


def qemu_version() -> str | None:
    """First line of `qemu-system-x86_64 --version`, or None when it is not installed."""
    exe = shutil.which(QEMU)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return (out.stdout.strip().splitlines() or ["?"])[0]


class Qmp:
    """A QMP client on a unix socket: one JSON object a line, `qmp_capabilities` first.

    A reader thread files each reply under its id and keeps each event, with the
    perf_counter time it arrived, in `events`; commands wait for their own id and skip
    everything else.
    """

    def __init__(self, path: Path, proc: Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if not proc.running:
                    raise BenchError(f"{proc.name} exited {proc.returncode}: "
                                     f"{proc.stderr_tail()}") from None
                if time.monotonic() > deadline:
                    raise BenchError(f"no QMP socket {path} after {timeout:.0f} s") from None
                time.sleep(0.02)
        self.sock = sock
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._replies: dict[str, dict[str, Any]] = {}
        self._greeting: dict[str, Any] | None = None
        self._closed = False
        self._next = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self._wait(lambda: self._greeting is not None, timeout, "the QMP greeting")
        self.cmd("qmp_capabilities")

    def _read(self) -> None:
        try:
            with self.sock.makefile("rb") as f:
                for line in f:
                    t = time.perf_counter()
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    with self._cond:
                        if "QMP" in msg:
                            self._greeting = msg
                        elif "event" in msg:
                            self.events.append((t, msg))
                        elif "id" in msg:
                            self._replies[str(msg["id"])] = msg
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self._closed, timeout):
                raise BenchError(f"QMP: no answer to {what} after {timeout:.0f} s")
            if not ready():
                raise BenchError(f"QMP: connection closed waiting for {what}")

    def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """Execute one command; return its `return` value, raise BenchError on `error`."""
        with self._cond:
            self._next += 1
            ident = f"bench-{self._next}"
        msg: dict[str, Any] = {"execute": name, "id": ident}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise BenchError(f"QMP {name}: {e}") from None
        self._wait(lambda: ident in self._replies, timeout, name)
        with self._cond:
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise BenchError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def migration_status(self) -> tuple[float, str] | None:
        """(arrival time, status) of the last MIGRATION event that ended one: completed/failed."""
        with self._cond:
            for t, ev in reversed(self.events):
                status = ev.get("data", {}).get("status")
                if ev.get("event") == "MIGRATION" and status in ("completed", "failed"):
                    return t, status
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class QemuVm:
    """A paused (-S) TCG guest with a QMP socket: a source whose guest RAM holds `data`
    (the generic loader at QEMU_LOAD_ADDR), or a destination (-incoming defer)."""

    def __init__(self, sockdir: Path, role: str, mem_mb: int, data: Path | None) -> None:
        self.sock = sockdir / f"qmp-{role}.sock"
        unlink(self.sock)
        cmd = [QEMU, "-accel", "tcg", "-machine", "q35", "-m", f"{mem_mb}M", "-nographic",
               "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none", "-S",
               "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if data is not None:
            cmd += ["-device", f"loader,file={data},addr={QEMU_LOAD_ADDR:#x},force-raw=on"]
        else:
            cmd += ["-incoming", "defer"]
        t = time.perf_counter()
        self.proc = Proc(cmd, rss=True)
        self.qmp: Qmp | None = None
        try:
            self.qmp = Qmp(self.sock, self.proc)
        except BenchError:
            self.close()
            raise
        self.ready_s = time.perf_counter() - t

    @property
    def q(self) -> Qmp:
        assert self.qmp is not None
        return self.qmp

    def close(self) -> None:
        """`quit` over QMP (GNU time then records the peak RSS); SIGKILL if that fails."""
        if self.qmp is not None:
            if self.proc.running:
                with contextlib.suppress(BenchError):
                    self.qmp.cmd("quit", timeout=10)
            self.qmp.close()
        with contextlib.suppress(BenchError):
            self.proc.wait(15)
        self.proc.kill()
        unlink(self.sock)


def loopback_tx_bytes() -> int | None:
    """Bytes sent on `lo` so far (/proc/net/dev), system-wide."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    return None


def qemu_wait_migration(vms: dict[str, QemuVm], timeout: float) -> dict[str, float]:
    """Wait until every VM's migration completed; return perf_counter times per VM.

    The time is the arrival of the MIGRATION event (capability `events`) or of the reply to
    a `query-migrate` poll (every 50 ms) that saw status completed, whichever comes first.
    (Not the time a poll was sent: QEMU finishes the migration holding its big
    lock, which delays QMP replies, so a poll sent before completion may answer "completed".)
    """
    deadline = time.monotonic() + timeout
    done: dict[str, float] = {}
    last_poll = 0.0
    while len(done) < len(vms):
        poll = time.monotonic() - last_poll >= 0.05
        if poll:
            last_poll = time.monotonic()
        for name, vm in vms.items():
            if name in done:
                continue
            ev = vm.q.migration_status()
            if ev is not None:
                if ev[1] == "failed":
                    info = vm.q.cmd("query-migrate")
                    raise BenchError(f"QEMU {name}: migration failed: "
                                     f"{info.get('error-desc', info)}")
                done[name] = ev[0]
                continue
            if poll:
                status = vm.q.cmd("query-migrate").get("status")
                if status == "completed":  # seen at some point before its reply: take the reply
                    done[name] = time.perf_counter()
                elif status == "failed":
                    raise BenchError(f"QEMU {name}: migration failed")
        if not vms[next(iter(vms))].proc.running or time.monotonic() > deadline:
            raise BenchError(f"QEMU migration did not complete in {timeout:.0f} s: {done}")
        time.sleep(0.005)
    return done


def qemu_migrate(data: Path, size: int, workdir: Path, *, channels: int = 2,
                 compression: str = "none", level: int | None = None,
                 verify: bool = False, timeout: float = 600) -> Sample:
    """Start a source guest holding `data` and a destination guest, both paused (untimed),
    then time one QEMU multifd migration between them over TCP loopback.

    "s" is from sending `migrate` to the source's status completed; "dst_s" to the
    destination's. With `verify`, the destination's guest RAM at QEMU_LOAD_ADDR is saved
    with pmemsave (untimed) and compared with `data`.
    """
    mem_mb = -(-(QEMU_LOAD_ADDR + size) // MiB)
    caps = [{"capability": "multifd", "state": True}, {"capability": "events", "state": True}]
    params: dict[str, Any] = {"multifd-channels": channels, "multifd-compression": compression,
                              "max-bandwidth": 10 ** 12}
    if level is not None:
        params[f"multifd-{compression}-level"] = level
    vms: dict[str, QemuVm] = {}
    try:
        vms["source"] = QemuVm(workdir, "source", mem_mb, data)
        vms["destination"] = QemuVm(workdir, "destination", mem_mb, None)
        src, dst = vms["source"], vms["destination"]
        for vm in (src, dst):
            vm.q.cmd("migrate-set-capabilities", {"capabilities": caps})
            vm.q.cmd("migrate-set-parameters", params)
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dst.q.cmd("migrate-incoming", {"uri": uri})
        wait_listening(port)
        w0 = loopback_tx_bytes()
        t0 = time.perf_counter()
        src.q.cmd("migrate", {"uri": uri})
        ends = qemu_wait_migration(vms, timeout)
        w1 = loopback_tx_bytes()
        info = src.q.cmd("query-migrate")
        if verify:
            mem = workdir / "qemu-destination.mem"
            try:
                dst.q.cmd("pmemsave", {"val": QEMU_LOAD_ADDR, "size": size,
                                       "filename": str(mem)}, timeout=300)
                if not filecmp.cmp(data, mem, shallow=False):
                    raise BenchError(f"QEMU destination's guest RAM differs from {data}")
            finally:
                unlink(mem)
        startup = max(src.ready_s, dst.ready_s)
    finally:
        for vm in reversed(list(vms.values())):
            vm.close()
    ram = info.get("ram", {})
    return {
        "s": ends["source"] - t0, "dst_s": ends["destination"] - t0,
        "total_time_ms": info.get("total-time"), "setup_time_ms": info.get("setup-time"),
        "downtime_ms": info.get("downtime"), "ram_transferred_bytes": ram.get("transferred"),
        "transferred_bytes": w1 - w0 if w0 is not None and w1 is not None else None,
        "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
        "startup_s": startup, "mem_mb": mem_mb,
        "send_rss_kb": vms["source"].proc.maxrss_kb,
        "recv_rss_kb": vms["destination"].proc.maxrss_kb,
    }


def case_qemu(ctx: Ctx, res: CaseResult) -> None:
    """multifd vs QEMU 7.2 multifd (paused TCG guests) for random and mixed data."""
    size = ctx.size
    mem_mb = -(-(QEMU_LOAD_ADDR + size) // MiB)
    res.title = f"qemu: multifd vs QEMU multifd, {human_size(size)}, 2 channels, loopback"
    ver = qemu_version()
    res.setup = (
        f"QEMU: `{ver or QEMU}`. Two guests per run, `-accel tcg -machine q35 -m {mem_mb}M "
        "-nographic -nodefaults -display none -serial none -S`; the source's guest RAM is "
        f"filled from the same data file (`-device loader,file=DATA,addr={QEMU_LOAD_ADDR:#x},"
        "force-raw=on`), the destination runs `-incoming defer`. Both are started fresh for "
        "every run and get, over QMP, `migrate-set-capabilities` multifd (and events) and "
        "`migrate-set-parameters` multifd-channels 2, multifd-compression (and its level), "
        "max-bandwidth 1e12; then `migrate-incoming` and `migrate` over tcp:127.0.0.1. "
        "**What is timed.** QEMU wall: from sending `migrate` to the source's status "
        "completed (arrival of its MIGRATION event or of a `query-migrate` reply saying so, "
        "polled every 50 ms, whichever comes first); QEMU "
        "start-up, filling guest RAM and the QMP set-up are not timed (shown as start-up). "
        "QEMU total-time is the source's own figure (`query-migrate`: from the migrate "
        "command to the end of its migration thread). multifd wall: from starting send "
        "(recv listening) to send's exit, so it includes send's Python start-up, recv's "
        "verification and linking the copy into place (tmpfs destination); multifd "
        "total_time_ms is send's JSON figure. QEMU also moves the rest of guest RAM "
        f"({human_size(mem_mb * MiB - size)}: zero pages, detected and sent as flags, plus "
        "firmware) and device state. MiB on the wire: multifd's transferred_bytes; for "
        "QEMU the bytes sent on the loopback interface from `migrate` to completion "
        "(/proc/net/dev, system-wide, so other loopback traffic would count too; TCP/IP "
        "headers included), because QEMU 7.2's ram.transferred counts multifd pages before "
        "compression (shown in the detail). The destination's RAM is compared with the data file "
        "once per QEMU variant (pmemsave, untimed). Rounds rotate the order.")
    if ver is None:
        res.tables.append(md_table(["peer", "status"], [[
            f"QEMU multifd ({QEMU})", f"not installed: `{QEMU_HINT}`"]]))
        res.summary.append(["QEMU multifd", "not installed", "-", f"`{QEMU_HINT}`"])
        return
    qdir = ctx.shm / "qemu"
    qdir.mkdir(exist_ok=True)
    dm = ctx.shm / "qemu.multifd"
    verified: set[str] = set()

    def qemu(data: Path, name: str, compression: str, level: int | None) -> Sample:
        s = qemu_migrate(data, size, qdir, compression=compression, level=level,
                         verify=name not in verified)
        verified.add(name)
        return s

    parts = []
    rnd = ctx.data.random_shm(size)
    ctx.log("  (a) random data, no compression")
    parts.append(("(a) random data, no compression", size, interleave({
        "multifd (none)": lambda: multifd_migrate(rnd, dm),
        "QEMU multifd (none)": lambda: qemu(rnd, "none", "none", None),
        # The floor for a file copy in Python: same processes and sockets, no protocol,
        # no hashing, no verification (benchmarks/naive.py).
        "naive Python copy": lambda: naive_copy(rnd, dm),
    }, ctx.pairs, ctx.log), [("multifd (none)", "QEMU multifd (none)", 0.8),
                             ("naive Python copy", "QEMU multifd (none)", None)]))
    mixed = ctx.data.mixed_shm(size)
    ctx.log("  (b) mixed data, compressed")
    parts.append(("(b) mixed data, compressed", size, interleave({
        "multifd (zstd:1)": lambda: multifd_migrate(mixed, dm, compress="zstd:1"),
        "multifd (lz4)": lambda: multifd_migrate(mixed, dm, compress="lz4"),
        "QEMU multifd (zstd level 1)": lambda: qemu(mixed, "zstd", "zstd", 1),
    }, ctx.pairs, ctx.log), [("multifd (zstd:1)", "QEMU multifd (zstd level 1)", 0.9),
                             ("multifd (lz4)", "QEMU multifd (zstd level 1)", 0.5)]))
    unlink(dm)
    shutil.rmtree(qdir, ignore_errors=True)
    for label, sz, runs, targets in parts:
        rows = []
        for v, x in runs.items():
            wire_b = [float(s["transferred_bytes"]) for s in x if s.get("transferred_bytes")]
            wire = f"{med(wire_b) / MiB:.0f}" if wire_b else "-"
            if v.startswith("QEMU"):
                detail = (f"destination completed at {spread(secs(x, 'dst_s'))} s; ram.transferred "
                          f"{med(secs(x, 'ram_transferred_bytes')) / MiB:.0f} MiB; setup-time "
                          f"{spread(secs(x, 'setup_time_ms'), 0)} ms; start-up (untimed) "
                          f"{spread(secs(x, 'startup_s'), 1)} s; zero pages "
                          f"{med(secs(x, 'zero_pages')):.0f}")
            elif v.startswith("naive"):
                detail = "2+2 processes, pread + sendall / recv_into + pwrite, nothing checked"
            else:
                detail = (f"recv exits at {spread(secs(x, 'recv_s'))} s; zero pages "
                          f"{med([float(s.get('zero_pages') or 0) for s in x]):.0f}")
            own = spread(secs(x, "total_time_ms"), 0) if "total_time_ms" in x[0] else "-"
            rows.append([v, spread(secs(x)), f"{sz / 1e6 / med(secs(x)):.0f}",
                         own, wire, detail, rss_text(x)])
        res.tables.append(f"**{label}, {human_size(sz)}**\n\n" + md_table(
            ["variant", "wall s median (min–max)", "MB/s of file",
             "own total time ms (multifd JSON total_time_ms / QEMU total-time)",
             "MiB on the wire", "detail", "peak RSS MiB send / recv (QEMU: source / dest)"],
            rows))
        rrows = []
        for a, b, target in targets:
            rt = ratio(secs(runs[a]), secs(runs[b]))
            if target is None:  # context: how close a check-nothing copy gets
                rrows.append([f"{a} wall / {b} wall (to source completed)", rt.text(),
                              f"{rt.below}/{len(rt.ratios)} rounds", "context"])
                res.summary.append([f"{a} / {b}, wall", rt.text(), "-", "context"])
                continue
            rd = ratio(secs(runs[a]), secs(runs[b], "dst_s"))
            rtot = ratio(secs(runs[a], "total_time_ms"), secs(runs[b], "total_time_ms"))
            ok = rt.median <= target
            rrows += [
                [f"{a} wall / {b} wall (to source completed)", rt.text(),
                 f"{rt.below}/{len(rt.ratios)} rounds",
                 f"≤ {target:g}: " + verdict(ok, f"{sum(r <= target for r in rt.ratios)}/"
                                                 f"{len(rt.ratios)} rounds")],
                [f"{a} wall / {b} wall (to destination completed)", rd.text(),
                 f"{rd.below}/{len(rd.ratios)} rounds", "context"],
                [f"{a} total_time_ms / {b} total-time", rtot.text(),
                 f"{rtot.below}/{len(rtot.ratios)} rounds", "context"]]
            res.summary.append([f"{a} / {b}, wall", rt.text(), f"≤ {target:g}", verdict(ok)])
            res.summary.append([f"{a} / {b}, own total times", rtot.text(), "-", "context"])
        res.tables.append(md_table(["ratio", "median of per-round ratios (min–max)",
                                    "multifd faster in", "target"], rrows))
        res.raw[label] = {"size": sz, "runs": runs}
    res.raw["qemu_version"] = ver
    res.raw["guest_mem_mb"] = mem_mb
