"""Starting, watching and stopping channel processes.

Channels are forked, so they inherit the source or destination fds and the
shared tables. Main talks to each over a Pipe carrying small typed messages
(each side's messages.py: work descriptions and reports, never page bytes) and
waits only on multiprocessing.connection.wait() with a deadline. This module
knows only the two messages of proc/messages.py; the rest it passes through.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Sequence

from multifd_cli.errors import (
    EXIT_CHANNEL_KILLED,
    EXIT_CODES,
    EXIT_INTERNAL,
    ConnectionFailed,
    MultifdError,
    WorkerFailed,
)
from multifd_cli.proc import logsetup
from multifd_cli.proc.messages import ChannelError, Quit

log = logging.getLogger("multifd")
CTX = multiprocessing.get_context("fork")


@dataclass
class Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    pipe: Connection

    def send(self, msg: object) -> None:
        """Send one typed message (send/messages.py, recv/messages.py, proc/messages.py)."""
        try:
            self.pipe.send(msg)
        except (BrokenPipeError, OSError):
            raise death_of(self) from None


PR_SET_PDEATHSIG = 1


M_TRIM_THRESHOLD = -1  # glibc mallopt() parameters
M_MMAP_THRESHOLD = -3
#: A channel allocates and frees a packet-sized buffer per packet (compressed
#: output, decompressed input). Under glibc's defaults each one was mapped or
#: trimmed and then faulted in again: lz4 send channels spent more time in the
#: kernel than compressing (1.3 s of system time per GiB). Buffers below this stay
#: in the heap, and the heap keeps this much free memory before giving it back.
MALLOC_KEEP = 32 << 20


def setup_child(parent_pid: int) -> None:
    """Die with main, and keep packet buffers in the heap."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    try:
        # A channel whose main is gone (even by SIGKILL) must not linger as an orphan.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except AttributeError:
        pass
    else:
        if os.getppid() != parent_pid:  # main died before prctl took effect
            os._exit(1)
    try:
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_KEEP)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MALLOC_KEEP)
    except AttributeError:
        pass  # not glibc: its allocator makes its own choices


_FORK_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def _child(
    parent_pid: int,
    index: int,
    pipe: Connection,
    close: Sequence[Any],
    target: Callable[..., None],
    args: tuple[Any, ...],
) -> None:
    # The terminal sends SIGINT to the whole group; main decides, channels follow.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # start() forked us with both blocked, so main's handler never ran here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
    setup_child(parent_pid)
    # The data path allocates a few lists per chunk and makes no cycles: walks
    # of everything inherited from main, every 700 allocations, were pure cost.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    logsetup.in_child()
    for obj in close:
        try:
            obj.close()
        except OSError:
            pass
    code = 0
    try:
        target(index, pipe, *args)
    except MultifdError as e:
        code = e.exit_code
        _report(pipe, ChannelError(e.exit_code, e.message))
    except BaseException as e:  # noqa: BLE001 - the channel must always report
        code = EXIT_INTERNAL
        log.debug("channel %d crashed:\n%s", index, traceback.format_exc())
        _report(pipe, ChannelError(EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e}"))
    finally:
        logsetup.flush_child()
        # Skip interpreter teardown: the fork inherited main's atexit hooks and
        # logging handlers, which must run only in main.
        os._exit(code)


def _report(pipe: Connection, msg: ChannelError) -> None:
    try:
        pipe.send(msg)
    except OSError:
        pass


def start(
    count: int,
    name: str,
    target: Callable[..., None],
    args_for: Callable[[int], tuple[Any, ...]],
    close_for: Callable[[int], Iterable[Any]] = lambda i: (),
) -> list[Worker]:
    """Fork `count` channel processes running target(index, pipe, *args_for(index))."""
    workers: list[Worker] = []
    ends: list[Connection] = []
    for i in range(count):
        parent, child = CTX.Pipe()
        # Each child must hold only its own pipe end, or a dead main is never seen as EOF.
        close = [parent, *ends, *[w.pipe for w in workers], *close_for(i)]
        p = CTX.Process(
            target=_child,
            name=f"{name}-ch{i}",
            args=(os.getpid(), i, child, close, target, args_for(i)),
            daemon=True,
        )
        # Until the child has its own handlers, a SIGINT/SIGTERM would run main's
        # (which raises) inside multiprocessing's bootstrap: a traceback on stderr.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child.close()
        workers.append(Worker(i, p, parent))
    return workers


def stop(workers: Sequence[Worker], grace: float = 1.0) -> None:
    """Ask, then terminate, then kill; reap every child so none is left behind."""
    for w in workers:
        try:
            w.pipe.send(Quit())
        except OSError:
            pass
    deadline = time.monotonic() + grace
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    for w in workers:
        w.process.join(1.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(1.0)
    for w in workers:
        w.pipe.close()


def terminate(workers: Sequence[Worker]) -> None:
    """Stop at once: used when the migration already failed."""
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    stop(workers, grace=0.0)


#: One channel's report to main, as main's poll() returns it.
Report = tuple[Worker, Any]


def _drain(w: Worker, reports: list[Report]) -> bool:
    """Move what `w` has sent into `reports`; False once its pipe is closed.

    A channel's ChannelError report raises WorkerFailed at once.
    """
    try:
        while w.pipe.poll():
            msg = w.pipe.recv()
            if isinstance(msg, ChannelError):
                raise WorkerFailed(msg.message, msg.exit_code, w.index)
            reports.append((w, msg))
    except (EOFError, OSError):
        return False
    return True


def poll(
    workers: Sequence[Worker],
    extra: Sequence[Any],
    timeout: float,
) -> tuple[list[Report], list[Any]]:
    """Wait for channel reports or readiness of `extra` objects (e.g. a socket).

    Returns the reports received and the ready extras. A channel that died
    without reporting, or reported an error, raises WorkerFailed.
    """
    by_pipe = {w.pipe: w for w in workers}
    by_sentinel = {w.process.sentinel: w for w in workers}
    ready = wait([*by_pipe, *by_sentinel, *extra], timeout)
    reports: list[Report] = []
    extras: list[Any] = []
    dead: list[Worker] = []
    for obj in ready:
        if obj in by_pipe:
            w = by_pipe[obj]
            if not _drain(w, reports):
                dead.append(w)
        elif obj in by_sentinel:
            dead.append(by_sentinel[obj])
        else:
            extras.append(obj)
    for w in dead:
        _drain(w, reports)  # a last report may sit in the pipe of a channel that just exited
        if not any(r[0] is w for r in reports) or w.process.exitcode not in (0, None):
            raise death_of(w)
    return reports, extras


def death_of(w: Worker) -> WorkerFailed:
    """What a channel that went away without reporting an error died of."""
    w.process.join(0.5)
    code = w.process.exitcode
    if code is not None and code < 0:
        # Channels die by a signal only when something outside sent it (an OOM
        # kill, a stray kill): not one of our bugs, so not exit 1.
        return WorkerFailed(f"the channel process was killed by {_signal_name(-code)}",
                            EXIT_CHANNEL_KILLED, w.index)
    if code is None:
        return WorkerFailed("the channel process is gone", EXIT_INTERNAL, w.index)
    if code in EXIT_CODES and code not in (0, EXIT_INTERNAL):
        # A channel exits with the code of the error it reported; if the report
        # itself was lost, the code still says what kind of failure it was.
        return WorkerFailed(f"the channel process exited with status {code} "
                            f"({EXIT_CODES[code]})", code, w.index)
    return WorkerFailed(f"channel process died (exit status {code})", EXIT_INTERNAL, w.index)


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def next_order(pipe: Connection) -> object:
    """A channel's next message from main; main gone (EOF) ends the channel as a
    connection failure, never a traceback."""
    try:
        return pipe.recv()
    except EOFError:
        raise ConnectionFailed("main process went away") from None
