"""One error hierarchy; every class carries its exit code.

The CLI's single top-level handler turns any MultifdError into one line on
stderr and its exit code. Anything else is a bug (exit 1) and gets a traceback
only with --debug.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_PROTOCOL = 4
EXIT_AUTH = 5
EXIT_VERIFY = 6
EXIT_IO = 7
EXIT_PAUSE = 8
EXIT_CONVERGE = 9
EXIT_CHANNEL_KILLED = 10
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error",
    EXIT_USAGE: "usage error",
    EXIT_CONNECTION: "connection or network failure, including a timeout",
    EXIT_PROTOCOL: "protocol error from the peer",
    EXIT_AUTH: "authentication failure",
    EXIT_VERIFY: "verification failed",
    EXIT_IO: "source or destination I/O error, such as a full disk",
    EXIT_PAUSE: "pause or resume action failed",
    EXIT_CONVERGE: "did not converge, or the downtime limit was exceeded under --strict-downtime",
    EXIT_CHANNEL_KILLED: "a channel process was killed by a signal from outside",
    EXIT_SIGINT: "interrupted by SIGINT",
    EXIT_SIGTERM: "terminated by SIGTERM",
}


class MultifdError(Exception):
    """Base of every error the user is meant to see as one line."""

    exit_code = EXIT_INTERNAL
    #: True when the peer reported or caused the failure, not this side.
    remote = False

    def __init__(self, message: str, *, channel: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.channel = channel

    def __str__(self) -> str:
        where = f"channel {self.channel}: " if self.channel is not None else ""
        return f"{where}{self.message}"


class InternalError(MultifdError):
    exit_code = EXIT_INTERNAL


class UsageError(MultifdError):
    exit_code = EXIT_USAGE


class ConnectionFailed(MultifdError):
    exit_code = EXIT_CONNECTION


class Timeout(ConnectionFailed):
    """The peer was silent for longer than --timeout."""


class ProtocolError(MultifdError):
    """Bytes that do not follow docs/protocol.md. Raised by the sans-IO codec."""

    exit_code = EXIT_PROTOCOL
    remote = True


class AuthError(MultifdError):
    exit_code = EXIT_AUTH


class VerifyError(MultifdError):
    exit_code = EXIT_VERIFY


class IOFailure(MultifdError):
    """Reading the source or writing the destination failed (ENOSPC, EIO, ...)."""

    exit_code = EXIT_IO


class PauseError(MultifdError):
    exit_code = EXIT_PAUSE


class ConvergeError(MultifdError):
    exit_code = EXIT_CONVERGE


class Cancelled(MultifdError):
    """A signal or a cancel request ended the migration."""

    def __init__(self, message: str, exit_code: int = EXIT_SIGINT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM. A KeyboardInterrupt, so that no `except Exception` on the
    way can swallow it, nor code that re-raises KeyboardInterrupt from a bare
    `except:` (multiprocessing-logging's emit does); it unwinds to the CLI,
    running every cleanup."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_of(e: BaseException) -> int:
    """The exit code an exception stands for; anything unexpected is internal."""
    if isinstance(e, (MultifdError, Interrupted)):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return EXIT_SIGINT
    return EXIT_INTERNAL


class PeerAborted(MultifdError):
    """The peer sent ABORT; we exit with the code it reported."""

    remote = True

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(f"peer aborted: {message}")
        self.exit_code = exit_code if exit_code in EXIT_CODES and exit_code else EXIT_PROTOCOL


def expect(what: str, got: object, expected: object) -> None:
    """Raise the codec's standard "got X, expected Y" error unless they match."""
    if got != expected:
        raise ProtocolError(f"{what}: got {got!r}, expected {expected!r}")


class WorkerFailed(MultifdError):
    """A channel reported an error; carries the channel's exit code."""

    def __init__(self, message: str, exit_code: int, channel: int) -> None:
        super().__init__(message, channel=channel)
        self.exit_code = exit_code


class RemoteRecvFailed(MultifdError):
    """The remote recv failed; send relays its exit code."""

    remote = True

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
