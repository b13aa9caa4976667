"""Start the receiving side over ssh, then connect to it directly (like rsync -e ssh).

`multifd send SOURCE --to ssh:[USER@]HOST[:PORT]:DEST` runs
``multifd recv --listen tcp:0.0.0.0:0 --json ... -- DEST`` on HOST through
ssh, reads the recv's "listening" event from the ssh session's stdout and
connects the channels straight to the announced port: ssh only starts the
remote side and carries its JSON events back; the data does not go through
the ssh tunnel (that would serialize every channel into one TCP stream).

The remote command line is
``<program> recv --listen LISTEN --json <recv_args...> -- <DEST>`` where every
argument after <program> is quoted with shlex.quote and <program> is
`remote_command` inserted verbatim (default ``multifd``). So `remote_command`
is a shell fragment the caller quotes itself, for example
``/opt/venv/bin/multifd``, ``python3 -m multifd_cli`` or
``env PYTHONPATH=/src /usr/bin/python3 -m multifd_cli``. A --listen in
`recv_args` wins over ours (click keeps the last one).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import math
import queue
import shlex
import subprocess
import threading
import time
from types import TracebackType
from typing import IO, Any, Deque, Sequence

from multifd_cli.errors import (
    EXIT_PROTOCOL,
    ConnectionFailed,
    MultifdError,
    RemoteRecvFailed,
    Timeout,
    UsageError,
)
from multifd_cli.net.address import SshTarget as SshTarget
from multifd_cli.net.address import parse_ssh_target as parse_ssh_target
from multifd_cli.net.transport import Uri, parse_uri

log = logging.getLogger("multifd")

#: ssh exits 255 when ssh itself failed (DNS, refused, auth, host key).
SSH_FAILED = 255
#: Remote lines kept for error messages, and remote events kept for `events()`.
_STDERR_KEEP = 20
_EVENTS_KEEP = 1000
#: One JSON line longer than this is not one of recv's events.
_MAX_LINE = 1 << 16
#: How long an exited-early ssh may take to be reaped before we report it.
_EXIT_GRACE = 5.0


def connect_uri(announced: str | Uri, host: str) -> Uri:
    """The address to connect to: the remote recv's port on the host we ssh'ed to.

    A recv listening on a wildcard (0.0.0.0, ::) announces that wildcard, which
    is not an address; any other announced host is kept as it is.
    """
    uri = parse_uri(announced) if isinstance(announced, str) else announced
    if uri.scheme != "tcp":
        raise ConnectionFailed(f"remote recv listens on {uri}, which is not reachable from here")
    try:
        wildcard = ipaddress.ip_address(uri.host.split("%")[0]).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        return uri
    return Uri("tcp", host=host.strip("[]"), port=uri.port)


def remote_command_line(target: SshTarget, recv_args: Sequence[str], *,
                        remote_command: str | None = None,
                        listen: str | None = None) -> str:
    """The one string ssh hands to the remote shell; see the module docstring."""
    program = remote_command if remote_command is not None else "multifd"
    if not program.strip():
        raise UsageError("the remote command is empty")
    if listen is None:
        listen = "tcp:[::]:0" if ":" in target.host else "tcp:0.0.0.0:0"
    args = ["recv", "--listen", listen, "--json", *recv_args, "--", target.dest]
    return " ".join([program, *(shlex.quote(a) for a in args)])


def _one_line(text: str, limit: int = 300) -> str:
    """Remote text in our one-line error messages: no control characters, bounded."""
    clean = "".join(c if c.isprintable() else " " for c in text).strip()
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


class RemoteRecv:
    """A `multifd recv` running on another host through ssh.

    Two daemon threads drain ssh's stdout (the recv's JSON events) and stderr
    (ssh's and the recv's messages, logged as "remote: ...") from the start,
    so neither pipe can fill up and stall the remote recv mid-migration.
    """

    def __init__(self, target: SshTarget, popen: subprocess.Popen[bytes], host: str) -> None:
        self.target = target
        self.popen = popen
        #: The host we connect the channels to (the ssh HostName, aliases resolved).
        self.connect_host = host
        self._uri: Uri | None = None
        self._first: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._events: Deque[dict[str, Any]] = collections.deque(maxlen=_EVENTS_KEEP)
        self._final: dict[str, Any] | None = None
        self._stderr: Deque[str] = collections.deque(maxlen=_STDERR_KEEP)
        assert popen.stdout is not None and popen.stderr is not None
        self._out_thread = threading.Thread(
            target=self._read_events, args=(popen.stdout,), name="ssh-events", daemon=True)
        self._err_thread = threading.Thread(
            target=self._drain_stderr, args=(popen.stderr,), name="ssh-stderr", daemon=True)
        self._out_thread.start()
        self._err_thread.start()

    # -- starting ---------------------------------------------------------------------
    @classmethod
    def start(cls, target: SshTarget, *, remote_command: str | None, recv_args: Sequence[str],
              timeout: float, ssh_options: Sequence[str] = (), ssh: str = "ssh",
              listen: str | None = None) -> RemoteRecv:
        """Run the remote recv and wait up to `timeout` seconds for its listening event.

        Runs ``ssh [-p PORT] -o BatchMode=yes <ssh_options> -o ConnectTimeout=N
        [USER@]HOST -- <remote command>``. ssh keeps the first value of an
        option, so `ssh_options` can override ConnectTimeout but not BatchMode
        (there is no terminal to type a password into). Raises ConnectionFailed
        (exit 3) when ssh or the remote command fails before listening, Timeout
        when nothing is announced in time, RemoteRecvFailed with the recv's exit
        code when the recv reported a failure.
        """
        host = _ssh_hostname(ssh, target, ssh_options) or target.host
        if listen is None and ":" in host:
            listen = "tcp:[::]:0"  # the alias resolved to an IPv6 address
        command = remote_command_line(target, recv_args, remote_command=remote_command,
                                      listen=listen)
        argv = [ssh, *_port_args(target), "-o", "BatchMode=yes", *ssh_options,
                "-o", f"ConnectTimeout={max(1, math.ceil(timeout))}",
                target.destination, "--", command]
        log.debug("starting remote recv: %s", shlex.join(argv))
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, close_fds=True)
        except OSError as e:
            raise ConnectionFailed(f"cannot run {ssh}: {e.strerror or e}") from None
        remote = cls(target, popen, host)
        try:
            remote._await_listening(time.monotonic() + timeout, timeout)
        except BaseException:
            remote.terminate()
            raise
        return remote

    def _await_listening(self, deadline: float, timeout: float) -> None:
        where = self.target.host
        while True:
            try:
                ev = self._first.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                last = self.last_stderr()
                raise Timeout(f"no listening event from the remote recv on {where} within "
                              f"{timeout:g}s" + (f": {last}" if last else "")) from None
            if ev is None:  # ssh closed its stdout: it is exiting
                rc = self._reap(_EXIT_GRACE)
                raise self._failure(rc, before_listening=True)
            name = ev.get("event")
            if name == "listening":
                uri = ev.get("uri")
                if not isinstance(uri, str):
                    raise ConnectionFailed(
                        f"remote recv on {where} announced no uri: {_one_line(str(ev))}")
                try:
                    self._uri = connect_uri(uri, self.connect_host)
                except UsageError as e:
                    raise ConnectionFailed(f"remote recv on {where}: {e}") from None
                log.info("remote recv on %s listening on %s, connecting to %s",
                         where, uri, self._uri)
                return
            if name == "failed":
                rc = self._reap(_EXIT_GRACE)
                raise self._failure(rc, before_listening=True)
            raise ConnectionFailed(
                f"remote recv on {where} sent a {_one_line(str(name))!r} event before listening")

    # -- the reader threads -----------------------------------------------------------
    def _read_events(self, stream: IO[bytes]) -> None:
        announced = False
        try:
            while raw := stream.readline(_MAX_LINE):
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
                if not isinstance(ev, dict) or "event" not in ev:
                    # e.g. a login script that prints to stdout; harmless, but say so.
                    log.warning("remote: stdout: %s", _one_line(line))
                    continue
                self._events.append(ev)
                if ev["event"] in ("completed", "failed"):
                    self._final = ev
                if not announced:
                    self._first.put(ev)
                    announced = ev["event"] == "listening"
        except (OSError, ValueError):
            pass
        finally:
            # Each reader closes its own pipe: closing it from another thread
            # would wait for the blocked readline.
            with contextlib.suppress(OSError):
                stream.close()
            self._first.put(None)

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        try:
            while raw := stream.readline(_MAX_LINE):
                line = _one_line(raw.decode("utf-8", "replace"), limit=1000)
                if line:
                    self._stderr.append(line)
                    log.info("remote: %s", line)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                stream.close()

    # -- after the migration ----------------------------------------------------------
    @property
    def uri(self) -> Uri:
        """Where send connects: the announced port on the ssh host."""
        if self._uri is None:
            raise ConnectionFailed("the remote recv is not listening")
        return self._uri

    @property
    def returncode(self) -> int | None:
        """ssh's exit status (the remote recv's, unless ssh itself failed: 255)."""
        return self.popen.returncode

    @property
    def final_event(self) -> dict[str, Any] | None:
        """The remote recv's completed or failed event, once it printed one."""
        return self._final

    def events(self) -> list[dict[str, Any]]:
        """The remote's JSON events so far (the last 1000), listening included."""
        return list(self._events)

    def last_stderr(self) -> str:
        """The remote's last stderr line: usually the reason ssh or recv gave up."""
        return self._stderr[-1] if self._stderr else ""

    def wait(self, timeout: float) -> int:
        """Wait for the remote recv (and ssh) to exit; return the exit status.

        Raises Timeout if it is still running after `timeout` seconds; the
        caller decides whether to terminate() it then.
        """
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Timeout(f"the remote recv on {self.target.host} did not exit within "
                          f"{timeout:g}s") from None
        self._join_readers(2.0)
        return rc

    def relay_failure(self, timeout: float = 30.0) -> None:
        """Raise the remote recv's failure (its message, its exit code) if it failed.

        Waits for the remote to exit first when it has not yet. Returns when
        the remote exited 0.
        """
        rc = self.returncode if self.returncode is not None else self.wait(timeout)
        if rc != 0:
            raise self._failure(rc, before_listening=False)

    def terminate(self) -> None:
        """Stop ssh, e.g. because send failed; idempotent.

        Without a terminal the remote recv gets no SIGHUP: it ends when its
        connection from send drops or its own --timeout expires.
        """
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._join_readers(1.0)

    def __enter__(self) -> RemoteRecv:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.terminate()

    # -- internals --------------------------------------------------------------------
    def _reap(self, grace: float) -> int | None:
        """Exit status of an ssh that is ending anyway; None if it lingers."""
        try:
            rc: int | None = self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            rc = None
        self._join_readers(1.0)
        return rc

    def _join_readers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in (self._out_thread, self._err_thread):
            t.join(max(0.0, deadline - time.monotonic()))

    def _failure(self, rc: int | None, *, before_listening: bool) -> MultifdError:
        """The error that describes how the remote side ended."""
        where = self.target.host
        last = self.last_stderr()
        ev = self._final
        if ev is not None and ev.get("event") == "failed":
            code = ev.get("exit_code")
            if type(code) is not int or not 0 < code < 256:
                code = EXIT_PROTOCOL
            error = _one_line(str(ev.get("error") or last or f"exit {code}"))
            return RemoteRecvFailed(f"remote recv on {where} failed: {error}", code)
        if rc == SSH_FAILED:
            return ConnectionFailed(f"ssh to {where} failed: {last or 'exit 255'}")
        if rc is not None and rc < 0:
            return ConnectionFailed(f"ssh to {where} was killed by signal {-rc}")
        status = f"exited {rc}" if rc is not None else "closed its output"
        detail = f": {last}" if last else ""
        if before_listening:
            if rc == 127:
                detail += " (is multifd installed there, and on the PATH of a non-login shell?)"
            return ConnectionFailed(f"remote recv on {where} {status} before listening{detail}")
        if rc is None or not 0 < rc < 256:
            return ConnectionFailed(f"remote recv on {where} {status}{detail}")
        return RemoteRecvFailed(f"remote recv on {where} {status}{detail}", rc)


def _port_args(target: SshTarget) -> list[str]:
    return ["-p", str(target.port)] if target.port is not None else []


def _ssh_hostname(ssh: str, target: SshTarget, ssh_options: Sequence[str]) -> str | None:
    """The HostName ssh would connect to (`ssh -G`), so ssh_config aliases work.

    Best effort: an old ssh without -G, or any trouble, means "use HOST as is".
    """
    try:
        out = subprocess.run([ssh, "-G", *_port_args(target), *ssh_options, target.destination],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=5.0, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value.strip():
            return value.strip()
    return None
