"""The embedding API goes through the CLI's validated configuration.

`LiveMigration` and `multifd send` both build their settings with
`SendConfig.create()`, so the API refuses, before connecting, every value the
CLI refuses. Each case runs through both doors and expects a usage error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from multifd_cli import cli
from multifd_cli.api import LiveMigration
from multifd_cli.compression import CompressionSpec
from multifd_cli.config import SendConfig
from multifd_cli.errors import EXIT_USAGE, UsageError
from multifd_cli.net.address import ImagePath, SshTarget, parse_destination
from multifd_cli.net.transport import Uri

TO = "tcp:127.0.0.1:9"  # nothing is ever connected: every case fails first

# (API keyword arguments, the same mistake on the command line, what the error says)
CASES: list[tuple[dict[str, Any], list[str], str]] = [
    ({"page_size": 1000}, ["--page-size", "1000"], "power of two"),
    ({"page_size": 256}, ["--page-size", "256"], "power of two"),
    ({"packet_size": 6000}, ["--packet-size", "6000"], "multiple of --page-size"),
    ({"compress": "brotli-nope"}, ["--compress", "brotli-nope"], "unknown compression"),
    ({"compress": "zstd:99"}, ["--compress", "zstd:99"], "out of range"),
    ({"compress": "auto:3"}, ["--compress", "auto:3"], "takes no level"),
    ({"to": "udp:1.2.3.4:5"}, ["--to", "udp:1.2.3.4:5"], "unknown scheme"),
    ({"to": "file:"}, ["--to", "file:"], "needs a path"),
    ({"to": "file:/tmp/x.img", "compress": "lz4"}, ["--to", "file:/tmp/x.img", "--compress", "lz4"],
     "rejected for file:"),
    ({"to": "ssh:-oProxyCommand=x:/d"}, ["--to", "ssh:-oProxyCommand=x:/d"], "must not start"),
    ({"channels": 0}, ["--channels", "0"], "channels"),
    ({"channels": 65}, ["--channels", "65"], "channels"),
    ({"max_passes": 0}, ["--max-passes", "0"], "max-passes"),
    ({"timeout": float("nan")}, ["--timeout", "nan"], "timeout"),
    ({"timeout": 0.01}, ["--timeout", "0.01"], "timeout"),
    ({"downtime_limit_ms": 0.5}, ["--downtime-limit", "0.5"], "downtime-limit"),
    ({"after_success": "drop"}, ["--after-success", "drop"], "after-success"),
]


@pytest.mark.parametrize(("kwargs", "argv", "message"), CASES,
                         ids=[" ".join(c[1]) for c in CASES])
def test_api_rejects_what_the_cli_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          kwargs: dict[str, Any], argv: list[str],
                                          message: str) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    to = kwargs.pop("to", TO)
    with pytest.raises(UsageError):
        LiveMigration(str(src), to, **kwargs)
    args = ["send", str(src), *(["--to", TO] if "--to" not in argv else []), *argv]
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == EXIT_USAGE
    assert message.lower() in capsys.readouterr().err.lower()


def test_api_accepts_good_values(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    mig = LiveMigration(str(src), TO, compress="zstd:3", page_size=8192, packet_size=64 << 10)
    cfg = mig.config
    assert cfg.to == Uri("tcp", host="127.0.0.1", port=9)
    assert cfg.compression == CompressionSpec("zstd", 3)
    assert cfg.compression.label == "zstd:3"


def test_destination_is_parsed_once_into_a_type() -> None:
    assert parse_destination("unix:/run/m.sock") == Uri("unix", path="/run/m.sock")
    assert parse_destination("file:/i.img") == ImagePath("/i.img")
    assert parse_destination("ssh:u@h:22:/d") == SshTarget("u", "h", 22, "/d")
    assert str(parse_destination("file:/i.img")) == "file:/i.img"


def test_create_takes_parsed_values_too() -> None:
    cfg = SendConfig.create(("a",), Uri("tcp", "h", 1), CompressionSpec("auto"))
    assert cfg.compression.adaptive and cfg.compression.label == "auto"
