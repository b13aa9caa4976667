"""Where `send --to` points, parsed once at the edge into one of three types.

    tcp:HOST:PORT, tcp:[IPv6]:PORT, unix:PATH  -> Uri        (a listening recv)
    ssh:[USER@]HOST[:PORT]:DEST               -> SshTarget  (recv started over ssh)
    file:PATH                                 -> ImagePath  (a fixed-offset image, no peer)

Everything past the command line holds a Destination and asks its type, never
the text again. Only parsing lives here, so telling the three apart imports
neither the ssh launcher nor the image code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from multifd_cli.errors import UsageError
from multifd_cli.net.transport import SSH_SCHEME as SCHEME
from multifd_cli.net.transport import Uri, parse_uri

IMAGE_SCHEME = "file:"


@dataclass(frozen=True)
class ImagePath:
    """``file:PATH``: send writes an image instead of talking to a recv."""

    path: str

    def __str__(self) -> str:
        return f"{IMAGE_SCHEME}{self.path}"


@dataclass(frozen=True)
class SshTarget:
    """Where to run the remote recv: ``ssh:[USER@]HOST[:PORT]:DEST``."""

    user: str | None
    host: str  # an IPv6 address without its brackets
    port: int | None
    dest: str

    @property
    def destination(self) -> str:
        """The ``[USER@]HOST`` argument of ssh (ssh takes IPv6 without brackets)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{SCHEME}{user}{host}{port}:{self.dest}"


def parse_ssh_target(text: str) -> SshTarget:
    """Parse ``ssh:[USER@]HOST[:PORT]:DEST``; IPv6 hosts go in brackets.

    After the host, a run of digits followed by ':' is the port; everything
    after that colon is DEST, colons included. A relative DEST that itself
    looks like ``123:x`` must be written ``./123:x``.
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"bad ssh target {text!r}: {why}")

    if not text.startswith(SCHEME):
        raise bad("expected ssh:[USER@]HOST[:PORT]:DEST")
    rest = text[len(SCHEME):]
    user: str | None = None
    at = rest.find("@")
    stops = [i for i in (rest.find(":"), rest.find("[")) if i != -1]
    if at != -1 and (not stops or at < min(stops)):
        user, rest = rest[:at], rest[at + 1:]
        if not user:
            raise bad("the user before '@' is empty")
        _check_word(user, "user", bad)
    if rest.startswith("["):
        host, close, after = rest[1:].partition("]")
        if not close:
            raise bad("missing ']' after the IPv6 address")
        if not after.startswith(":"):
            raise bad("expected ':' after ']', then DEST")
        after = after[1:]
    else:
        host, sep, after = rest.partition(":")
        if not sep:
            raise bad("expected ssh:[USER@]HOST[:PORT]:DEST, DEST is missing")
    if not host:
        raise bad("the host is missing (an IPv6 address goes in brackets: ssh:[::1]:DEST)")
    _check_word(host, "host", bad)
    if "@" in host:
        raise bad("more than one '@'")
    port: int | None = None
    head, sep, tail = after.partition(":")
    if sep and head == "":
        raise bad("the port between the two ':' is empty")
    if sep and head.isascii() and head.isdigit():
        port = int(head)
        if not 1 <= port <= 65535:
            raise bad(f"port {port} is outside 1..65535")
        after = tail
    if not after:
        raise bad("DEST is empty")
    if "\0" in after:
        raise bad("DEST contains a NUL byte")
    return SshTarget(user=user, host=host, port=port, dest=after)


def _check_word(word: str, what: str, bad: Callable[[str], UsageError]) -> None:
    """No option injection (a leading '-') and nothing ssh would split or mangle."""
    if word.startswith("-"):
        raise bad(f"the {what} must not start with '-'")
    if any(c.isspace() or not c.isprintable() for c in word):
        raise bad(f"the {what} contains a space or a control character")



Destination = Union[Uri, SshTarget, ImagePath]


def parse_destination(text: str) -> Destination:
    """Parse a --to value; UsageError says what is wrong with it."""
    if text.startswith(SCHEME):
        return parse_ssh_target(text)
    if text.startswith(IMAGE_SCHEME):
        if not text[len(IMAGE_SCHEME):]:
            raise UsageError("--to file:PATH needs a path")
        return ImagePath(text[len(IMAGE_SCHEME):])
    return parse_uri(text)
