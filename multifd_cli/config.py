"""Validated settings for both commands, parsed at the edge and passed inward."""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from multifd_cli.errors import UsageError
from multifd_cli.net.auth import Security
from multifd_cli.writer.pause import PauseSpec

if TYPE_CHECKING:  # parsed lazily: `multifd --version` needs neither
    from multifd_cli.compression import CompressionSpec
    from multifd_cli.net.address import Destination

#: Sizes and rates above this are absurd; it keeps every value a safe int64.
MAX_SIZE = 1 << 62
#: The longest timeout: the selectors' poll() takes an int32 of milliseconds.
MAX_TIMEOUT = 2_147_483.0
MAX_CHANNELS = 64
AFTER_SUCCESS = ("keep-paused", "resume")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(B?)\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse '4096', '4K', '512KiB'-less forms: K/M/G/T are powers of 1024, KB/MB/GB/TB of 1000.

    Exact arithmetic (Fraction), not float: a 400-digit number must be refused
    as a usage error, not become inf (and an OverflowError) on the way.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"bad {what} {_short(text)}: expected a number with an optional K, M, G, KB, MB or GB")
    number, unit, b = m.groups()
    if len(number.partition(".")[0].lstrip("0")) > 20 or len(number) > 64:
        # far beyond MAX_SIZE; also keeps int() under Python's digit limit
        raise UsageError(f"bad {what} {_short(text)}: too large (at most {MAX_SIZE})")
    unit = unit.upper()
    base = 1000 if (b and unit) else 1024
    power = "KMGT".find(unit) + 1 if unit else 0
    value = Fraction(number) * base**power
    if value.denominator != 1:
        raise UsageError(f"bad {what} {_short(text)}: not a whole number of bytes")
    if value > MAX_SIZE:
        raise UsageError(f"bad {what} {_short(text)}: too large (at most {MAX_SIZE})")
    return int(value)


def _short(text: str) -> str:
    """repr() of a user's value, cut so that one error line stays one readable line."""
    t = str(text).strip()
    return repr(t) if len(t) <= 40 else repr(t[:20] + "..." + t[-8:])


def parse_rate(text: str) -> int:
    """A rate in bytes per second: a size with an optional '/s'."""
    t = str(text).strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    return parse_size(t, what="rate")


@dataclass(frozen=True)
class Convergence:
    """When the pre-copy stops iterating (QEMU's downtime-limit, max-bandwidth, auto-converge)."""

    downtime_limit_ms: float = 300.0
    max_passes: int = 30
    auto_converge: bool = False
    strict_downtime: bool = False
    max_bandwidth: int = 0  # bytes/s shared by all channels; 0 is unlimited
    mtime_shortcut: bool = True  # an unchanged size, mtime and ctime ends the passes
    tracker: str = "auto"  # auto, hash or kernel: what finds the dirty pages (send/dirty.py)


@dataclass(frozen=True)
class SshLaunch:
    """How an ssh: target's recv is started."""

    command: str = ""  # the ssh command, e.g. "ssh -i key" (--ssh)
    remote_command: str = ""  # how to run multifd on the far side
    remote_recv_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateBlob:
    """The blob client: state read after the pause (the device-state analog)."""

    cmd: str = ""  # run it; its stdout is the state
    file: str = ""  # or read this file
    name: str = ""

    @property
    def wanted(self) -> bool:
        return bool(self.cmd or self.file)


@dataclass(frozen=True)
class Reading:
    """How the sources are read."""

    direct_io: bool = False  # O_DIRECT, for writers that bypass the page cache too
    one_file_system: bool = False  # a directory source: do not cross mount points (-x)


@dataclass(frozen=True)
class SendConfig:
    """What `send` does, already parsed: build it with `SendConfig.create()`."""

    sources: tuple[str, ...]
    to: Destination
    channels: int = 2
    compression: CompressionSpec = field(default_factory=lambda: _spec("none"))
    page_size: int = 4096
    packet_size: int = 512 << 10
    timeout: float = 60.0
    wait_for_recv: float = 0.0  # how long a refused connection to recv is retried
    json: bool = False
    convergence: Convergence = field(default_factory=Convergence)
    pause: PauseSpec = field(default_factory=PauseSpec)
    after_success: str = "keep-paused"  # or "resume"
    control: str = ""  # unix socket for `multifd status|cancel|set`
    progress: bool | None = None  # None: a status line only when stderr is a TTY
    json_interval: float = 1.0
    security: Security = field(default_factory=Security)
    ssh: SshLaunch = field(default_factory=SshLaunch)
    state: StateBlob = field(default_factory=StateBlob)
    preserve: bool = False
    reading: Reading = field(default_factory=Reading)

    @classmethod
    def create(cls, sources: tuple[str, ...], to: str | Destination,
               compression: str | CompressionSpec = "none", **settings: Any) -> SendConfig:
        """The one validated way in, for the CLI and the API alike.

        Parses --to and --compress once, and checks every rule that does not
        need the sources opened, so a bad value fails before anything connects.
        """
        from multifd_cli.net.address import ImagePath, parse_destination

        dest = parse_destination(to) if isinstance(to, str) else to
        spec = _spec(compression) if isinstance(compression, str) else compression
        cfg = cls(sources=tuple(sources), to=dest, compression=spec, **settings)
        if not cfg.sources:
            raise UsageError("no SOURCE given")
        if isinstance(dest, ImagePath) and spec.name != "none":
            raise UsageError("--compress is rejected for file: (every page has a fixed offset)")
        if cfg.ssh.command:
            _check_ssh_command(cfg.ssh.command)
        from multifd_cli.compression import get_compressor

        get_compressor(spec)  # a codec whose library is missing fails here, with a hint
        cfg._check_numbers()
        cfg.pause.validate()
        state = cfg.state
        if state.cmd and state.file:
            raise UsageError("--state-cmd and --state-file are alternatives: give one")
        if state.wanted and not cfg.pause.any:
            raise UsageError("the state is read after the pause: add --pause-pid, --pause-cgroup "
                             "or --pause-cmd")
        if state.file and not os.path.isfile(state.file):
            raise UsageError(f"--state-file {state.file}: no such file")
        if cfg.convergence.auto_converge and not (cfg.pause.pids or cfg.pause.cgroup):
            raise UsageError("--auto-converge needs a writer to throttle: --pause-pid or --pause-cgroup")
        return cfg

    def _check_numbers(self) -> None:
        from multifd_cli import wire as P

        ps = self.page_size
        if not P.page_size_ok(ps):
            raise UsageError(
                f"--page-size {ps}: expected a power of two from {P.MIN_PAGE_SIZE} to {P.MAX_PAGE_SIZE}"
            )
        if self.packet_size % ps or not ps <= self.packet_size <= P.MAX_PACKET_SIZE:
            raise UsageError(
                f"--packet-size {self.packet_size}: expected a multiple of --page-size ({ps}) "
                f"up to {P.MAX_PACKET_SIZE}"
            )
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise UsageError(f"--channels {self.channels}: expected 1 to {MAX_CHANNELS}")
        conv = self.convergence
        if conv.tracker not in ("auto", "hash", "kernel"):
            raise UsageError(f"--tracker {conv.tracker!r}: expected auto, hash or kernel")
        if conv.max_passes < 1:
            raise UsageError(f"--max-passes {conv.max_passes}: expected at least 1")
        _check_range("--timeout", self.timeout, 0.1, MAX_TIMEOUT)
        _check_range("--wait-for-recv", self.wait_for_recv, 0, MAX_TIMEOUT)
        _check_range("--downtime-limit", conv.downtime_limit_ms, 1, MAX_TIMEOUT * 1000)
        _check_range("--json-interval", self.json_interval, 0.05, MAX_TIMEOUT)
        if not 0 <= conv.max_bandwidth <= MAX_SIZE:
            raise UsageError(f"--max-bandwidth {conv.max_bandwidth}: expected 0 to {MAX_SIZE}")
        if self.after_success not in AFTER_SUCCESS:
            raise UsageError(
                f"--after-success {self.after_success!r}: expected {' or '.join(AFTER_SUCCESS)}"
            )


def _spec(text: str) -> CompressionSpec:
    from multifd_cli.compression import parse_spec

    return parse_spec(text)


def _check_range(what: str, value: float, lo: float, hi: float) -> None:
    # nan and inf pass every comparison and then hang or crash the code that uses them
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UsageError(f"{what} {value:g}: expected a number from {lo:g} to {hi:g}")


def _check_ssh_command(ssh_cmd: str) -> None:
    """--ssh is split like a shell would; refuse it now rather than when ssh starts."""
    try:
        words = shlex.split(ssh_cmd)
    except ValueError as e:
        raise UsageError(f"--ssh {ssh_cmd!r}: {e}") from None
    if not words:
        raise UsageError(f"--ssh {ssh_cmd!r}: expected a command, e.g. 'ssh -i KEY'")


@dataclass(frozen=True)
class RecvConfig:
    dest: str
    listen: str = "tcp:127.0.0.1:0"
    timeout: float = 60.0
    force: bool = False
    keep_partial: bool = False
    json: bool = False
    max_channels: int = 64
    resume: bool = False
    source: str = ""  # --from file:IMAGE: restore an image instead of listening
    restore_channels: int = 2
    progress: bool | None = None
    json_interval: float = 1.0
    security: Security = field(default_factory=Security)


@dataclass
class TestHooks:
    """Switches that exist only so tests can show the barrier matters."""

    no_barrier: bool = False
    delay_channel: int = -1
    delay_seconds: float = 0.0
    delay_epoch: int = 0
    between_passes: str = ""
    internal_error: bool = False  # raise a bug-like exception, to test exit code 1
    stale_tree: bool = False  # a directory source's final pass reuses the last walk
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> TestHooks:
        hooks = cls(no_barrier=os.environ.get("MULTIFD_TEST_NO_BARRIER") == "1")
        spec = os.environ.get("MULTIFD_TEST_DELAY", "")
        if spec:
            parts = spec.split(":")
            hooks.delay_channel = int(parts[0])
            hooks.delay_seconds = float(parts[1])
            hooks.delay_epoch = int(parts[2]) if len(parts) > 2 else 0
        hooks.between_passes = os.environ.get("MULTIFD_TEST_BETWEEN_PASSES", "")
        hooks.internal_error = os.environ.get("MULTIFD_TEST_INTERNAL_ERROR") == "1"
        hooks.stale_tree = os.environ.get("MULTIFD_TEST_STALE_TREE") == "1"
        return hooks
