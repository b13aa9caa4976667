"""The click commands: parse and validate options into a config, then call in.

Every argument is checked before anything is opened, bound or connected. One
handler, `main()`, turns every error into one line on stderr and its exit code;
a traceback appears only with --debug.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import traceback
from typing import Any, Callable, NoReturn

import click

from multifd_cli import __version__
from multifd_cli.config import (
    AFTER_SUCCESS,
    MAX_CHANNELS,
    MAX_TIMEOUT,
    Convergence,
    Reading,
    RecvConfig,
    SendConfig,
    SshLaunch,
    StateBlob,
    TestHooks,
    parse_rate,
    parse_size,
)
from multifd_cli.errors import (
    EXIT_INTERNAL,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    Interrupted,
    MultifdError,
    UsageError,
    exit_code_of,
)

log = logging.getLogger("multifd")
_debug = False
_json_requested = False  # --json seen: failures must end with a "failed" event too
_failed_emitted = False
_side_name = "cli"


class SizeType(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A byte count with an optional K/M/G (1024) or KB/MB/GB (1000) suffix."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except UsageError as e:
            self.fail(e.message, param, ctx)


SIZE = SizeType()


class RateType(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """Bytes per second: a size with an optional '/s'."""

    name = "rate"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_rate(value)
        except UsageError as e:
            self.fail(e.message, param, ctx)


RATE = RateType()



class FiniteFloat(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A float in [lo, hi]. Unlike click.FloatRange it refuses nan and inf, which
    pass every comparison test and then hang or crash the code that uses them."""

    name = "float"

    def __init__(self, lo: float, hi: float) -> None:
        self.lo = lo
        self.hi = hi

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            rv = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value} is not a finite number", param, ctx)
        if not self.lo <= rv <= self.hi:
            self.fail(f"{rv:g} is not in the range {self.lo:g} to {self.hi:g}", param, ctx)
        return rv


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options both commands share, composed once."""
    options = [
        click.option("--json", "json_events", is_flag=True, envvar="MULTIFD_JSON",
                     show_envvar=True, help="Print one JSON event per line on stdout."),
        click.option("--timeout", type=FiniteFloat(0.1, MAX_TIMEOUT), default=60.0,
                     show_default=True, envvar="MULTIFD_TIMEOUT", show_envvar=True,
                     help="Seconds to wait for the peer, and the longest silence tolerated."),
        click.option("--log-level", default=None, show_default="warning on a terminal, else info",
                     type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
                     envvar="MULTIFD_LOG_LEVEL", show_envvar=True),
        click.option("--log-file", type=click.Path(dir_okay=False), default=None,
                     envvar="MULTIFD_LOG_FILE", show_envvar=True,
                     help="Write logs here instead of stderr."),
        click.option("--debug", is_flag=True, help="Show tracebacks for errors."),
        click.option("--progress/--no-progress", "progress", default=None,
                     help="Force the progress line on or off (default: on when stderr is a TTY)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress line and no summary."),
        click.option("--json-interval", type=FiniteFloat(0.05, MAX_TIMEOUT), default=1.0,
                     show_default=True, metavar="SECONDS",
                     help="Seconds between JSON progress events (with --json)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _security(f: Callable[..., Any]) -> Callable[..., Any]:
    """Authentication and encryption options, the same on both commands."""
    options = [
        click.option("--psk-file", type=click.Path(dir_okay=False), default=None,
                     envvar="MULTIFD_PSK_FILE", show_envvar=True,
                     help="Pre-shared key; every connection must prove it knows it. "
                          "Authenticates only: add TLS to protect the data."),
        click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                     envvar="MULTIFD_TLS_CERT", show_envvar=True,
                     help="Certificate (PEM): recv's server certificate, or send's client one."),
        click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
                     envvar="MULTIFD_TLS_KEY", show_envvar=True, help="Key for --tls-cert."),
        click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
                     envvar="MULTIFD_TLS_CA", show_envvar=True,
                     help="CA that signs the peer's certificate. On recv it makes client "
                          "certificates mandatory."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _load_security(side: str, psk_file: str | None, tls_cert: str | None,
                   tls_key: str | None, tls_ca: str | None, tls_hostname: str | None,
                   default_host: str | None) -> Any:
    from multifd_cli.net.auth import Security, load_psk

    psk = load_psk(psk_file) if psk_file else None
    tls = None
    if side == "recv":
        if (tls_key or tls_ca) and not tls_cert:
            raise UsageError("recv needs --tls-cert to use TLS")
        if tls_cert:
            from multifd_cli.net.handshake import tls_server_context

            tls = tls_server_context(tls_cert, tls_key, tls_ca)
    elif tls_cert or tls_ca or tls_hostname:
        from multifd_cli.net.handshake import tls_client_context

        tls = tls_client_context(tls_ca, tls_cert, tls_key)
    return Security(psk, tls, tls_hostname or default_host)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="multifd")
def cli() -> None:
    """Live-migrate a changing file to another host over parallel channels.

    Start `multifd recv DEST` on the destination, then `multifd send SOURCE
    --to URI` on the source. Exit codes are listed in the README.
    """


def setup_session(debug: bool, log_level: str | None, log_file: str | None) -> None:
    """Logging (main and channels), and SIGINT/SIGTERM turned into Interrupted.

    Public so that a test or an embedding program can set up a process the way
    `multifd send|recv` does before it runs anything.
    """
    global _debug
    _debug = debug
    from multifd_cli.proc import logsetup

    logsetup.configure("debug" if debug else log_level, log_file)

    def on_signal(signum: int, frame: Any) -> None:
        if logsetup.hold_signal(signum):
            return  # raised when the log call in progress has finished
        if signum == signal.SIGTERM:
            raise Interrupted("terminated by SIGTERM", EXIT_SIGTERM)
        raise Interrupted("interrupted by SIGINT", EXIT_SIGINT)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def _run(side: str, json_events: bool, body: Callable[[Any], dict[str, Any]],
         quiet: bool = False) -> None:
    from multifd_cli.events import Events, human_summary
    from multifd_cli.proc import logsetup

    global _failed_emitted
    events = Events(side, json_events)
    try:
        logsetup.install_for_channels()
        summary = body(events)
    except BaseException as e:
        code = exit_code_of(e)
        events.emit("failed", error=_one_line(e), exit_code=code)
        _failed_emitted = True
        raise
    finally:
        logsetup.shutdown()
    events.emit("completed", status="completed", **summary)
    if not json_events and not quiet:
        click.echo(human_summary(side, "completed", summary), err=True)


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=True))
@click.option("--listen", default="tcp:127.0.0.1:0", show_default=True, envvar="MULTIFD_LISTEN",
              show_envvar=True, help="tcp:HOST:PORT, tcp:[IPv6]:PORT or unix:PATH; port 0 picks one.")
@click.option("--force", is_flag=True, help="Replace an existing DEST, atomically at completion.")
@click.option("--keep-partial", is_flag=True, help="Keep a failed copy as DEST.partial.")
@click.option("--from", "from_", default="", metavar="file:IMAGE",
              help="Restore an image written by `send --to file:IMAGE` instead of listening.")
@click.option("--channels", type=click.IntRange(1, MAX_CHANNELS), default=2, show_default=True,
              help="With --from: channel processes restoring in parallel.")
@click.option("--resume", is_flag=True,
              help="Update an old copy (DEST.partial, else DEST) in place, sending only what "
                   "differs. The exception to the unnamed-file rule: DEST is written in place.")
@_security
@_common
def recv(dest: str, listen: str, force: bool, keep_partial: bool, from_: str, channels: int,
         resume: bool,
         json_events: bool,
         timeout: float, log_level: str | None, log_file: str | None, debug: bool,
         progress: bool | None, quiet: bool, json_interval: float, psk_file: str | None,
         tls_cert: str | None, tls_key: str | None, tls_ca: str | None) -> None:
    """Receive one migration into DEST, then exit."""
    _note_json("recv", json_events)
    from multifd_cli.net.transport import parse_uri

    parse_uri(listen)
    if from_ and not from_.startswith("file:"):
        raise UsageError(f"--from {from_}: expected file:IMAGE")
    if from_ and not from_[5:]:
        raise UsageError("--from file:IMAGE needs a path")
    if from_ and resume:
        raise UsageError("--from and --resume do not combine")
    if log_file and _same_file(log_file, dest):
        raise UsageError(f"--log-file {log_file} is DEST: give the log another path")
    security = _load_security("recv", psk_file, tls_cert, tls_key, tls_ca, None, None)
    cfg = RecvConfig(dest=dest, listen=listen, timeout=timeout, force=force,
                     keep_partial=keep_partial, resume=resume, json=json_events,
                     source=from_[5:], restore_channels=channels,
                     progress=False if quiet else progress, json_interval=json_interval,
                     security=security)
    setup_session(debug, log_level, log_file)
    hooks = TestHooks.from_env()

    def body(events: Any) -> dict[str, Any]:
        if cfg.source:
            from multifd_cli.recv import restore

            return restore.run(cfg, events, cfg.source)
        from multifd_cli.recv import receiver

        return receiver.run(cfg, events, hooks)

    _run("recv", json_events, body, quiet)


@cli.command()
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--to", "to", required=True, envvar="MULTIFD_TO", show_envvar=True,
              help="Where recv listens: tcp:HOST:PORT, tcp:[IPv6]:PORT or unix:PATH; or "
                   "ssh:[USER@]HOST[:PORT]:DEST to start recv there over ssh.")
@click.option("--ssh", "ssh_cmd", default="", envvar="MULTIFD_SSH", show_envvar=True,
              metavar="CMD", help="ssh command for ssh: targets, e.g. 'ssh -i ~/.ssh/key'.")
@click.option("--remote-command", default="", envvar="MULTIFD_REMOTE_COMMAND",
              show_envvar=True, metavar="CMD",
              help="How to run multifd on the ssh host (default: multifd), "
                   "e.g. '/opt/venv/bin/multifd' or 'python3 -m multifd_cli'.")
@click.option("--remote-force", is_flag=True,
              help="For ssh: targets, pass --force to the remote recv.")
@click.option("--channels", type=click.IntRange(1, MAX_CHANNELS), default=2, show_default=True,
              envvar="MULTIFD_CHANNELS", show_envvar=True,
              help="Parallel channel processes, each with its own socket.")
@click.option("--compress", "compress", default="none", show_default=True,
              envvar="MULTIFD_COMPRESS", show_envvar=True,
              help="none, zlib, lz4 or zstd, with an optional :LEVEL; or auto, which picks "
                   "none, lz4 or zstd per packet from measured ratio, CPU cost and link speed.")
@click.option("--page-size", type=SIZE, default="4K", show_default=True,
              help="Unit of dirty tracking: a power of two from 512 bytes to 1M.")
@click.option("--packet-size", type=SIZE, default="512K", show_default=True,
              help="Payload of one packet: a multiple of the page size, up to 64M.")
@click.option("--max-passes", type=click.IntRange(1), default=30, show_default=True,
              envvar="MULTIFD_MAX_PASSES", show_envvar=True,
              help="Give up (exit 9) if the source still changes after this many passes.")
@click.option("--downtime-limit", type=FiniteFloat(1, MAX_TIMEOUT * 1000), default=300, show_default=True,
              envvar="MULTIFD_DOWNTIME_LIMIT", show_envvar=True, metavar="MS",
              help="Switch over once the rest fits in this many milliseconds.")
@click.option("--pause-pid", type=int, multiple=True, metavar="PID",
              help="Pause this writer with SIGSTOP for the switchover (repeatable).")
@click.option("--pause-cgroup", metavar="PATH", default="",
              help="Freeze this cgroup v2 (all its processes and threads) for the switchover.")
@click.option("--pause-cmd", metavar="CMD", default="",
              help="Run CMD to pause the writer (e.g. 'fsfreeze -f /mnt'); needs --resume-cmd.")
@click.option("--resume-cmd", metavar="CMD", default="", help="Run CMD to resume the writer.")
@click.option("--after-success", type=click.Choice(AFTER_SUCCESS),
              default="keep-paused", show_default=True,
              help="What to do with the paused writer once the copy is complete. keep-paused, "
                   "like QEMU's postmigrate, stops writes that the copy would never see.")
@click.option("--tracker", type=click.Choice(["auto", "hash", "kernel"]), default="auto",
              show_default=True, envvar="MULTIFD_TRACKER", show_envvar=True,
              help="What finds the dirty pages: kernel (tracefs events, as root on a disk "
                   "filesystem), hash (reads the whole source each pass), or auto: kernel "
                   "where it can be had, else hash with a warning saying why.")
@click.option("--auto-converge", is_flag=True,
              help="Throttle the writer when it dirties faster than the link sends.")
@click.option("--strict-downtime", is_flag=True,
              help="Exit 9 instead of switching over when --max-passes is reached above the limit.")
@click.option("--wait-for-recv", type=FiniteFloat(0, MAX_TIMEOUT), default=0.0, metavar="SECONDS",
              envvar="MULTIFD_WAIT_FOR_RECV", show_envvar=True,
              help="Keep trying this long while nobody listens at --to (for scripts that start "
                   "both sides at once); by default send fails at once, as ssh does.")
@click.option("--max-bandwidth", type=RATE, default="0", metavar="RATE",
              envvar="MULTIFD_MAX_BANDWIDTH", show_envvar=True,
              help="Bytes/s for all channels together (100M, 1G); lifted during the downtime.")
@click.option("--control", metavar="unix:PATH", default="", envvar="MULTIFD_CONTROL",
              show_envvar=True,
              help="Serve `multifd status|cancel|set --control PATH` while migrating.")
@click.option("--state-cmd", default="", metavar="CMD",
              help="After the pause, run CMD; its stdout travels as a blob (the device-state "
                   "analog) and lands next to the blocks. DEST becomes a directory.")
@click.option("--state-file", default="", metavar="PATH",
              help="After the pause, send this file whole as a blob.")
@click.option("--state-name", default="", metavar="NAME",
              help="Name of the blob in DEST (default: 'state', or the --state-file name).")
@click.option("--preserve", is_flag=True,
              help="Keep mode, owner (as root), mtime and extended attributes, like rsync -a.")
@click.option("--direct-io", is_flag=True,
              help="Read the source with O_DIRECT, for writers that bypass the page cache.")
@click.option("-x", "--one-file-system", "one_file_system", is_flag=True,
              help="A directory SOURCE: do not cross into other filesystems (as rsync -x).")
@click.option("--tls-hostname", default=None, envvar="MULTIFD_TLS_HOSTNAME", show_envvar=True,
              help="Name the destination's certificate must carry (default: the --to host).")
@_security
@click.option("--no-mtime-shortcut", is_flag=True,
              help="Always confirm with a pass that finds nothing, even when size, mtime and "
                   "ctime did not change (needed for writers that use mmap).")
@_common
def send(sources: tuple[str, ...], to: str, ssh_cmd: str, remote_command: str,
         remote_force: bool, channels: int, compress: str, page_size: int,
         packet_size: int, max_passes: int, downtime_limit: float, pause_pid: tuple[int, ...],
         pause_cgroup: str, pause_cmd: str, resume_cmd: str, after_success: str,
         tracker: str, auto_converge: bool, strict_downtime: bool, wait_for_recv: float, max_bandwidth: int,
         control: str, no_mtime_shortcut: bool, json_events: bool, timeout: float,
         log_level: str | None, log_file: str | None, debug: bool, progress: bool | None, quiet: bool,
         json_interval: float, state_cmd: str, state_file: str, state_name: str,
         preserve: bool, direct_io: bool, one_file_system: bool, tls_hostname: str | None,
         psk_file: str | None,
         tls_cert: str | None, tls_key: str | None, tls_ca: str | None) -> None:
    """Migrate SOURCE to the recv listening at --to."""
    _note_json("send", json_events)
    from multifd_cli.net.address import ImagePath, parse_destination
    from multifd_cli.writer.pause import PauseSpec

    dest = parse_destination(to)
    host = None if isinstance(dest, ImagePath) else dest.host or None  # for --tls-hostname
    if log_file:
        from multifd_cli.send.sources import source_names

        for path, _ in source_names(sources):
            if _same_file(log_file, path):
                raise UsageError(f"--log-file {log_file} is the source {path}: logging into it "
                                 "would change what is migrated")
    security = _load_security("send", psk_file, tls_cert, tls_key, tls_ca, tls_hostname, host)
    cfg = SendConfig.create(
        sources, dest, compress, channels=channels, page_size=page_size,
        packet_size=packet_size, timeout=timeout, wait_for_recv=wait_for_recv, json=json_events,
        convergence=Convergence(
            downtime_limit_ms=downtime_limit, max_passes=max_passes,
            auto_converge=auto_converge, strict_downtime=strict_downtime,
            max_bandwidth=max_bandwidth, mtime_shortcut=not no_mtime_shortcut,
            tracker=tracker,
        ),
        pause=PauseSpec(pause_pid, pause_cgroup, pause_cmd, resume_cmd),
        after_success=after_success, control=control,
        progress=False if quiet else progress, json_interval=json_interval,
        security=security,
        ssh=SshLaunch(ssh_cmd, remote_command, ("--force",) if remote_force else ()),
        state=StateBlob(state_cmd, state_file, state_name),
        preserve=preserve, reading=Reading(direct_io, one_file_system),
    )
    setup_session(debug, log_level, log_file)
    hooks = TestHooks.from_env()

    def body(events: Any) -> dict[str, Any]:
        from multifd_cli.send import orchestrator

        return orchestrator.run(cfg, events, hooks)

    _run("send", json_events, body, quiet)


def _same_file(a: str, b: str) -> bool:
    """True when paths a and b name one file (or would, once created)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they lead
        return os.path.realpath(a) == os.path.realpath(b)


def _control_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--control", "control", required=True, metavar="unix:PATH",
                        envvar="MULTIFD_CONTROL", show_envvar=True,
                        help="The --control socket of the running send.")(f)


def _ask(control: str, req: dict[str, Any]) -> dict[str, Any]:
    from multifd_cli.net.control import control_path, request

    reply = request(control_path(control), req)
    if not reply.get("ok"):
        raise UsageError(str(reply.get("error", "refused")))
    return reply


@cli.command()
@_control_option
def status(control: str) -> None:
    """Print a running send's counters as JSON (like query-migrate)."""
    import json

    reply = _ask(control, {"cmd": "status"})
    reply.pop("ok", None)
    click.echo(json.dumps(reply))


@cli.command()
@_control_option
def cancel(control: str) -> None:
    """Cancel a running send; its writer is resumed and it exits 130."""
    _ask(control, {"cmd": "cancel"})


@cli.command("set")
@_control_option
@click.argument("param", type=click.Choice(["max-bandwidth", "downtime-limit"]))
@click.argument("value")
def set_param(control: str, param: str, value: str) -> None:
    """Change max-bandwidth (RATE) or downtime-limit (MS) of a running send."""
    _ask(control, {"cmd": "set", "param": param, "value": value})


@cli.command()
@click.argument("send_events", metavar="SEND-EVENTS.jsonl")
@click.argument("recv_events", metavar="[RECV-EVENTS.jsonl]", required=False)
@click.option("--output", "-o", required=True, metavar="FILE",
              help="The picture: FILE.png, FILE.svg, or FILE.html (figures embedded).")
def report(send_events: str, recv_events: str | None, output: str) -> None:
    """Draw a migration pass by pass from its --json events (send's, and recv's if given).

    Needs matplotlib: pip install 'multifd-cli[report]'. Bad input exits 2.
    """
    from multifd_cli.report import write_report

    write_report(send_events, recv_events, output)


def _note_json(side: str, enabled: bool) -> None:
    global _json_requested, _side_name
    _json_requested = enabled
    _side_name = side


def _exit(code: int, message: str) -> NoReturn:
    """Print the one-line error (and the failed event, under --json) and exit."""
    click.echo(f"multifd: error: {message}", err=True)
    if _json_requested and not _failed_emitted:
        from multifd_cli.events import Events

        Events(_side_name, True).emit("failed", error=message, exit_code=code)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    if isinstance(e, (MultifdError, Interrupted)):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"internal error: {type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _fill_closed_std_fds()
    try:
        cli.main(args=args, prog_name="multifd", standalone_mode=False)
    except click.exceptions.Exit as e:  # --version, --help
        if argv is None:
            _leave_now(e.exit_code)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        if not args or args in (["send"], ["recv"]) and "Usage:" in e.format_message():
            click.echo(e.format_message(), err=True)  # no arguments at all: show the help
            sys.exit(EXIT_USAGE)
        # click rejected an option before the command ran: same one-line rule.
        if args and args[0] in ("send", "recv"):
            _note_json(args[0], "--json" in args or os.environ.get("MULTIFD_JSON") == "1")
        hint = f" (see 'multifd {args[0]} --help')" if args and args[0] in ("send", "recv") else ""
        _exit(EXIT_USAGE, e.format_message().replace("\n", " ") + hint)
    except click.exceptions.Abort as e:
        # click turns a KeyboardInterrupt (our Interrupted is one) into Abort.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, Interrupted):
            _exit(cause.exit_code, cause.message)
        _exit(EXIT_SIGINT, "interrupted")
    except (MultifdError, Interrupted) as e:
        if _debug:
            traceback.print_exc()
        _exit(e.exit_code, _one_line(e))
    except KeyboardInterrupt:
        _exit(EXIT_SIGINT, "interrupted")
    except Exception as e:  # noqa: BLE001 - the one place that catches everything
        if _debug:
            traceback.print_exc()
        _exit(EXIT_INTERNAL, f"{_one_line(e)} (run with --debug for a traceback)")
    if argv is None:
        _leave_now(0)
    sys.exit(0)


def _fill_closed_std_fds() -> None:
    """Point a closed fd 0, 1 or 2 (`>&-`) at /dev/null.

    Otherwise the next file or socket opened takes that number, and a child that
    inherits it (--pause-cmd, --state-cmd, ssh) would write into it as its stdout.
    sys.stdout stays None: Events then write nothing.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
            except OSError:
                return
            if null == fd:
                os.set_inheritable(fd, True)  # like the fd it stands in for
            else:
                os.dup2(null, fd)
                os.close(null)


def _leave_now(code: int) -> NoReturn:
    """Exit a finished run without the interpreter's teardown.

    By now every channel is reaped, the copy is linked and fsynced, and every
    file is closed; what is left is freeing tens of thousands of objects one by
    one, which cost ~25 ms of every run. Output is flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with it closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
