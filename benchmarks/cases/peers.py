"""peers: multifd against socat (or nc), an rsync daemon and zstd | socat, when they
are installed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

from harness import INSTALL_HINT, Sample
from harness.procs import Proc, free_port, timed, unlink, wait_listening
from harness.report import CaseResult, Ctx, md_table
from harness.runs import interleave, multifd_migrate, rss_text, verify_once
from harness.stats import human_size, med, ratio, secs, spread


def nc_is_openbsd() -> bool:
    nc = shutil.which("nc")
    if not nc:
        return False
    out = subprocess.run([nc, "-h"], capture_output=True, text=True)
    return "-N" in out.stdout + out.stderr


def pipe_copy(recv_cmd: str, send_cmd: str, port: int, dst: Path) -> Sample:
    """Start a shell receiver listening on port, then time the sender until both exited."""
    unlink(dst)
    recv = Proc([recv_cmd], shell=True)
    try:
        wait_listening(port)
        t0 = time.perf_counter()
        s = Proc([send_cmd], t0=t0, shell=True).wait(600)
        recv.t0 = t0
        r = recv.wait(60)
    finally:
        recv.kill()
    return {"s": max(s, r), "send_s": s, "recv_s": r}


@contextlib.contextmanager
def rsync_daemon(root: Path, work: Path) -> Iterator[int]:
    port = free_port()
    conf = work / "rsyncd.conf"
    ids = f"uid = {os.getuid()}\ngid = {os.getgid()}\n" if os.getuid() == 0 else ""
    conf.write_text(f"use chroot = no\n{ids}pid file = {work / 'rsyncd.pid'}\n"
                    f"[bench]\npath = {root}\nread only = no\n")
    d = Proc(["rsync", "--daemon", "--no-detach", "--address", "127.0.0.1",
              "--port", str(port), "--config", str(conf)])
    try:
        wait_listening(port)
        yield port
    finally:
        d.kill()
        unlink(conf)


def case_peers(ctx: Ctx, res: CaseResult) -> None:
    """socat (or nc), rsync daemon, zstd | socat, against multifd, when installed."""
    q = shlex.quote
    res.title = f"peers: {human_size(ctx.size)} of mixed data over loopback, tmpfs to tmpfs"
    res.setup = ("The compression case's mixed file. Peers are timed from starting the sender "
                 "(receiver already listening) until sender and receiver both exited; no fsync "
                 "needed on tmpfs. rsync runs against a loopback rsync daemon (`rsync "
                 "--inplace --whole-file SRC rsync://127.0.0.1:PORT/bench/DST`), started once, "
                 "untimed. Rounds rotate the order; ratios are per round. Nothing is installed "
                 f"by this script: `{INSTALL_HINT}`.")
    have = {t: shutil.which(t) is not None for t in ("socat", "rsync", "zstd", "nc")}
    variants: dict[str, Callable[[], Sample]] = {}
    missing: list[list[str]] = []
    dsts: list[Path] = []

    def dst_for(name: str) -> Path:
        p = ctx.shm / f"peer-{name}.dst"
        dsts.append(p)
        return p

    def socat_raw() -> Sample:
        port, d = free_port(), dst_for("socat")
        r = pipe_copy(f"socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 OPEN:{q(str(d))},creat",
                      f"socat -u FILE:{q(str(src))} TCP:127.0.0.1:{port}", port, d)
        verify_once(src, d)
        return r

    def nc_raw() -> Sample:
        port, d = free_port(), dst_for("nc")
        r = pipe_copy(f"nc -l 127.0.0.1 {port} > {q(str(d))}",
                      f"nc -N 127.0.0.1 {port} < {q(str(src))}", port, d)
        verify_once(src, d)
        return r

    def zstd_pipe() -> Sample:
        port, d = free_port(), dst_for("zstd")
        r = pipe_copy(
            f"socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 - | zstd -d -q -f -o {q(str(d))}",
            f"zstd -1 -T2 -q -c {q(str(src))} | socat -u - TCP:127.0.0.1:{port}", port, d)
        verify_once(src, d)
        return r

    raw_name = None
    if have["socat"]:
        raw_name = "socat"
        variants["socat (raw TCP into a file)"] = socat_raw
    elif have["nc"] and nc_is_openbsd():
        raw_name = "nc"
        variants["nc (openbsd, raw TCP into a file)"] = nc_raw
    else:
        missing.append(["socat / nc (raw TCP into a file)",
                        f"not installed: `{INSTALL_HINT}`"])
    if not have["rsync"]:
        missing.append(["rsync (loopback daemon)", f"not installed: `{INSTALL_HINT}`"])
    if have["zstd"] and have["socat"]:
        variants["zstd -1 -T2 | socat"] = zstd_pipe
    else:
        what = " and ".join(t for t in ("zstd", "socat") if not have[t])
        missing.append(["zstd -1 -T2 | socat", f"{what} not installed: `{INSTALL_HINT}`"])

    if not variants and not have["rsync"]:
        res.tables.append(md_table(["peer", "status"], missing))
        res.summary.append(["peers", "none installed", "-", f"`{INSTALL_HINT}`"])
        return

    src = ctx.data.mixed_shm(ctx.size)  # only now: nothing to compare with made no file
    dm, dz = dst_for("multifd"), dst_for("multifd-zstd")
    with contextlib.ExitStack() as stack:
        if have["rsync"]:
            rs_root = ctx.shm / "rsync-root"
            rs_root.mkdir(exist_ok=True)
            port = stack.enter_context(rsync_daemon(rs_root, ctx.disk))
            rs_dst = rs_root / "peer-rsync.dst"
            dsts.append(rs_dst)

            def rsync_run() -> Sample:
                unlink(rs_dst)
                r = {"s": timed([["rsync", "--inplace", "--whole-file", str(src),
                                  f"rsync://127.0.0.1:{port}/bench/{rs_dst.name}"]])[0]}
                verify_once(src, rs_dst)
                return r
            variants["rsync (loopback daemon)"] = rsync_run
        all_variants: dict[str, Callable[[], Sample]] = {
            "multifd (none)": lambda: multifd_migrate(src, dm)}
        if "zstd -1 -T2 | socat" in variants:
            all_variants["multifd (zstd:1)"] = lambda: multifd_migrate(src, dz, compress="zstd:1")
        all_variants.update(variants)
        runs = interleave(all_variants, ctx.pairs, ctx.log)
    for p in dsts:
        unlink(p)
    with contextlib.suppress(OSError):
        (ctx.shm / "rsync-root").rmdir()
    mbs = ctx.size / 1e6
    rows = [[v, spread(secs(x)), f"{mbs / med(secs(x)):.0f}", rss_text(x)]
            for v, x in runs.items()]
    rows += [[peer, status, "-", "-"] for peer, status in missing]
    res.tables.append(md_table(["variant", "wall s median (min–max)", "MB/s of file",
                                "peak RSS MiB send / recv"], rows))
    rrows = []
    for peer in runs:
        if peer.startswith("multifd"):
            continue
        base = "multifd (zstd:1)" if peer.startswith("zstd") else "multifd (none)"
        rt = ratio(secs(runs[base]), secs(runs[peer]))
        rrows.append([f"{base} / {peer}", rt.text(), f"{rt.below}/{len(rt.ratios)} rounds"])
        res.summary.append([f"{base} / {peer}, wall", rt.text(), "-", "context"])
    for peer, _ in missing:
        res.summary.append([peer, "not installed", "-", f"`{INSTALL_HINT}`"])
    res.tables.append(md_table(["ratio", "median of per-round ratios (min–max)",
                                "multifd faster in"], rrows))
    res.raw = {"runs": runs, "missing": missing, "raw_tool": raw_name}
