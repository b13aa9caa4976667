"""`send --to ssh:[USER@]HOST[:PORT]:DEST`: the target parser, the remote command,
and RemoteRecv against a fake ssh (runs the command locally, fast, always
available) and against a real sshd on a loopback port (skipped without sshd).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers.mfdkit import sha256, spawn, write_random
from helpers.sshd import INSTALL_HINT, Sshd, find_sshd

from multifd_cli.errors import (
    EXIT_CONNECTION,
    EXIT_USAGE,
    ConnectionFailed,
    RemoteRecvFailed,
    Timeout,
    UsageError,
)
from multifd_cli.net.ssh import (
    RemoteRecv,
    SshTarget,
    connect_uri,
    parse_ssh_target,
    remote_command_line,
)
from multifd_cli.net.transport import Uri, is_ssh_target

ROOT = Path(__file__).resolve().parents[1]
# The remote side must run THIS checkout, whatever the remote shell's cwd is.
THIS_MULTIFD = f"env PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m multifd_cli"


# -- parse_ssh_target -----------------------------------------------------------------
@pytest.mark.parametrize(
    "text, user, host, port, dest",
    [
        ("ssh:host:/d", None, "host", None, "/d"),
        ("ssh:user@host:/d", "user", "host", None, "/d"),
        ("ssh:host:2222:/d", None, "host", 2222, "/d"),
        ("ssh:u.name@host-1.example.org:22:rel/path", "u.name", "host-1.example.org", 22, "rel/path"),
        ("ssh:[::1]:2222:/d", None, "::1", 2222, "/d"),
        ("ssh:user@[::1]:/d", "user", "::1", None, "/d"),
        ("ssh:[fe80::1%eth0]:/d", None, "fe80::1%eth0", None, "/d"),
        ("ssh:host:/a:b:c", None, "host", None, "/a:b:c"),
        ("ssh:host:22:/a:b", None, "host", 22, "/a:b"),
        ("ssh:host:2222", None, "host", None, "2222"),  # no colon after the digits: DEST
        ("ssh:host:123:x", None, "host", 123, "x"),
        ("ssh:host:./123:x", None, "host", None, "./123:x"),
        ("ssh:host:~/img with space.raw", None, "host", None, "~/img with space.raw"),
        ("ssh:10.0.0.5:65535:/d", None, "10.0.0.5", 65535, "/d"),
    ],
)
def test_parse_ssh_target(text: str, user: str | None, host: str, port: int | None,
                          dest: str) -> None:
    t = parse_ssh_target(text)
    assert t == SshTarget(user=user, host=host, port=port, dest=dest)
    assert is_ssh_target(text)
    assert parse_ssh_target(str(t)) == t


def test_ssh_destination_argument() -> None:
    assert parse_ssh_target("ssh:u@[::1]:22:/d").destination == "u@::1"
    assert parse_ssh_target("ssh:host:/d").destination == "host"
    assert str(parse_ssh_target("ssh:u@[::1]:22:/d")) == "ssh:u@[::1]:22:/d"


@pytest.mark.parametrize(
    "text, why",
    [
        ("host:/d", "expected ssh:"),
        ("tcp:127.0.0.1:5000", "expected ssh:"),
        ("ssh:", "DEST is missing"),
        ("ssh:host", "DEST is missing"),
        ("ssh:host:", "DEST is empty"),
        ("ssh:host:22:", "DEST is empty"),
        ("ssh::/d", "host is missing"),
        ("ssh:::1:/d", "brackets"),
        ("ssh:@host:/d", "user before '@' is empty"),
        ("ssh:[::1:/d", "missing ']'"),
        ("ssh:[::1]/d", "expected ':' after ']'"),
        ("ssh:[]:/d", "host is missing"),
        ("ssh:host:0:/d", "outside 1..65535"),
        ("ssh:host:70000:/d", "outside 1..65535"),
        ("ssh:host::/d", "port between the two ':' is empty"),
        ("ssh:-oProxyCommand=touch_x:/d", "must not start with '-'"),
        ("ssh:-l@host:/d", "must not start with '-'"),
        ("ssh:a@b@c:/d", "more than one '@'"),
        ("ssh:ho st:/d", "space or a control character"),
        ("ssh:host:/d\0x", "NUL"),
    ],
)
def test_parse_ssh_target_rejects(text: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_ssh_target(text)
    message = str(info.value)
    assert why in message
    assert message.startswith("bad ssh target ")
    assert "\n" not in message
    assert info.value.exit_code == EXIT_USAGE


def test_is_ssh_target() -> None:
    assert not is_ssh_target("tcp:host:1")
    assert not is_ssh_target("unix:/x")


# -- the connect address and the remote command ---------------------------------------
@pytest.mark.parametrize(
    "announced, host, expected",
    [
        ("tcp:0.0.0.0:4000", "example.org", "tcp:example.org:4000"),
        ("tcp:0.0.0.0:4000", "::1", "tcp:[::1]:4000"),
        ("tcp:0.0.0.0:4000", "[::1]", "tcp:[::1]:4000"),
        ("tcp:[::]:4000", "192.0.2.7", "tcp:192.0.2.7:4000"),
        ("tcp:[::]:4000", "2001:db8::7", "tcp:[2001:db8::7]:4000"),
        ("tcp:[::0]:4000", "h", "tcp:h:4000"),
        ("tcp:10.1.2.3:4000", "example.org", "tcp:10.1.2.3:4000"),  # a real address is kept
        ("tcp:[2001:db8::1]:4000", "example.org", "tcp:[2001:db8::1]:4000"),
    ],
)
def test_connect_uri(announced: str, host: str, expected: str) -> None:
    uri = connect_uri(announced, host)
    assert str(uri) == expected
    assert connect_uri(Uri("tcp", "0.0.0.0", 9), "h") == Uri("tcp", "h", 9)


def test_connect_uri_rejects_unix() -> None:
    with pytest.raises(ConnectionFailed):
        connect_uri("unix:/tmp/sock", "host")


def test_remote_command_line_quotes_everything_after_the_program() -> None:
    target = parse_ssh_target("ssh:host:/data/it's $(here).raw")
    line = remote_command_line(target, ["--timeout", "30", "--force"])
    assert line.startswith("multifd recv --listen tcp:0.0.0.0:0 --json --timeout 30 --force -- ")
    assert shlex.split(line)[-1] == "/data/it's $(here).raw"
    assert shlex.split(line)[-2] == "--"
    custom = remote_command_line(target, [], remote_command="python3 -m multifd_cli")
    assert custom.startswith("python3 -m multifd_cli recv ")
    v6 = remote_command_line(parse_ssh_target("ssh:[::1]:/d"), [])
    assert "--listen 'tcp:[::]:0'" in v6
    assert "--listen tcp:127.0.0.1:0" in remote_command_line(target, [], listen="tcp:127.0.0.1:0")
    with pytest.raises(UsageError):
        remote_command_line(target, [], remote_command="  ")


# -- RemoteRecv with a fake ssh: runs the remote command locally ----------------------
FAKE_SSH = """\
import os, signal, subprocess, sys
args = sys.argv[1:]
if "-G" in args:
    sys.exit(1)  # like an ssh without -G: RemoteRecv must use HOST as is
log = os.environ.get("FAKE_SSH_ARGV")
if log:
    with open(log, "w") as f:
        f.write("\\0".join(args))
remote = subprocess.Popen(["sh", "-c", args[-1]], start_new_session=True)
def hang_up(signum, frame):  # the session ends: the remote side goes with it
    os.killpg(remote.pid, signal.SIGKILL)
    sys.exit(255)
signal.signal(signal.SIGTERM, hang_up)
sys.exit(remote.wait())
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text(f"#!{sys.executable}\n{FAKE_SSH}")
    path.chmod(0o755)
    return str(path)


def _echo(event: dict[str, object]) -> str:
    """A shell command that prints `event` as one JSON line, like recv --json."""
    return f"echo {shlex.quote(json.dumps(event))}"


LISTENING_1234 = _echo({"event": "listening", "uri": "tcp:0.0.0.0:1234"})


def test_fake_ssh_argv(fake_ssh: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv_file = tmp_path / "argv"
    monkeypatch.setenv("FAKE_SSH_ARGV", str(argv_file))
    target = parse_ssh_target(f"ssh:me@localhost:2200:{tmp_path / 'd'}")
    with RemoteRecv.start(target, remote_command=THIS_MULTIFD, recv_args=["--timeout", "5"],
                          timeout=20, ssh_options=["-o", "Foo=bar"], ssh=fake_ssh) as remote:
        args = argv_file.read_text().split("\0")
        assert args[:4] == ["-p", "2200", "-o", "BatchMode=yes"]
        assert args[4:6] == ["-o", "Foo=bar"]
        assert args[6] == "-o" and args[7].startswith("ConnectTimeout=")
        assert args[8:10] == ["me@localhost", "--"]
        assert args[10] == remote_command_line(target, ["--timeout", "5"],
                                               remote_command=THIS_MULTIFD)
        assert remote.uri.host == "localhost" and remote.uri.port > 0
    assert remote.returncode is not None  # the context manager stopped it


def test_fake_ssh_migration(fake_ssh: str, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.bin", 2 << 20)
    dest = tmp_path / "dest.bin"
    target = parse_ssh_target(f"ssh:127.0.0.1:{dest}")
    # A login script that prints to stdout must not break the handshake.
    noisy = f"echo 'Welcome to the test host'; {THIS_MULTIFD}"
    with RemoteRecv.start(target, remote_command=noisy, recv_args=["--timeout", "30"],
                          timeout=20, ssh=fake_ssh) as remote:
        assert str(remote.uri).startswith("tcp:127.0.0.1:")
        send = spawn(["send", "--json", "--timeout", "30", str(src), "--to", str(remote.uri)])
        assert send.wait() == 0, send.stderr
        assert remote.wait(60) == 0
        remote.relay_failure()  # no failure: returns
        assert remote.final_event is not None
        assert remote.final_event["event"] == "completed"
        assert [e["event"] for e in remote.events()][0] == "listening"
    assert sha256(src) == sha256(dest)


def test_remote_failure_before_listening(fake_ssh: str, tmp_path: Path) -> None:
    target = parse_ssh_target(f"ssh:127.0.0.1:{tmp_path / 'missing' / 'dest'}")
    with pytest.raises(RemoteRecvFailed) as info:
        RemoteRecv.start(target, remote_command=THIS_MULTIFD, recv_args=[], timeout=20,
                         ssh=fake_ssh)
    assert info.value.exit_code == EXIT_USAGE
    assert "does not exist" in str(info.value)
    assert "\n" not in str(info.value)


def test_remote_failure_after_listening_is_relayed(fake_ssh: str) -> None:
    failed = _echo({"event": "failed", "error": "disk full", "exit_code": 7})
    script = f"{LISTENING_1234}; {failed}; exit 7 #"
    target = parse_ssh_target("ssh:example.invalid:/d")
    with RemoteRecv.start(target, remote_command=script, recv_args=[], timeout=20,
                          ssh=fake_ssh) as remote:
        assert remote.uri == Uri("tcp", "example.invalid", 1234)
        assert remote.wait(20) == 7
        assert remote.final_event is not None and remote.final_event["exit_code"] == 7
        with pytest.raises(RemoteRecvFailed) as info:
            remote.relay_failure()
    assert info.value.exit_code == 7
    assert "disk full" in str(info.value)


def test_remote_exit_without_event_is_relayed(fake_ssh: str) -> None:
    script = f"{LISTENING_1234}; echo 'Segmentation fault' >&2; exit 6 #"
    with RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command=script, recv_args=[],
                          timeout=20, ssh=fake_ssh) as remote, \
            pytest.raises(RemoteRecvFailed) as info:
        remote.relay_failure(20)
    assert info.value.exit_code == 6
    assert "Segmentation fault" in str(info.value)


def test_ssh_failure_is_a_connection_failure(fake_ssh: str) -> None:
    script = "echo 'me@h: Permission denied (publickey).' >&2; exit 255 #"
    with pytest.raises(ConnectionFailed) as info:
        RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command=script, recv_args=[],
                         timeout=20, ssh=fake_ssh)
    assert not isinstance(info.value, RemoteRecvFailed)
    assert info.value.exit_code == EXIT_CONNECTION
    assert str(info.value) == "ssh to h failed: me@h: Permission denied (publickey)."


def test_remote_command_not_found(fake_ssh: str) -> None:
    with pytest.raises(ConnectionFailed) as info:
        RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command="no-such-multifd-xyz",
                         recv_args=[], timeout=20, ssh=fake_ssh)
    assert info.value.exit_code == EXIT_CONNECTION
    assert "exited 127 before listening" in str(info.value)
    assert "not found" in str(info.value)


def test_other_event_before_listening(fake_ssh: str) -> None:
    script = f"{_echo({'event': 'progress'})}; sleep 30 #"
    t0 = time.monotonic()
    with pytest.raises(ConnectionFailed, match="'progress' event before listening"):
        RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command=script, recv_args=[],
                         timeout=20, ssh=fake_ssh)
    assert time.monotonic() - t0 < 10


def test_listening_timeout(fake_ssh: str) -> None:
    script = "echo 'still thinking' >&2; sleep 30 #"
    t0 = time.monotonic()
    with pytest.raises(Timeout) as info:
        RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command=script, recv_args=[],
                         timeout=0.5, ssh=fake_ssh)
    assert time.monotonic() - t0 < 5
    assert info.value.exit_code == EXIT_CONNECTION
    assert "within 0.5s" in str(info.value) and "still thinking" in str(info.value)


def test_stderr_goes_to_the_log(fake_ssh: str, caplog: pytest.LogCaptureFixture) -> None:
    script = f"echo 'hello from remote' >&2; {LISTENING_1234}; exit 0 #"
    logger = logging.getLogger("multifd")
    old = logger.propagate
    logger.propagate = True  # the CLI turns propagation off; caplog listens at the root
    try:
        with caplog.at_level(logging.INFO, logger="multifd"), \
                RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command=script,
                                 recv_args=[], timeout=20, ssh=fake_ssh) as remote:
            assert remote.wait(20) == 0
    finally:
        logger.propagate = old
    assert "remote: hello from remote" in caplog.messages


def test_missing_ssh_binary(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match="cannot run"):
        RemoteRecv.start(parse_ssh_target("ssh:h:/d"), remote_command=None, recv_args=[],
                         timeout=5, ssh=str(tmp_path / "no-ssh"))


# -- against a real sshd --------------------------------------------------------------
@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    path = find_sshd()
    if path is None:
        pytest.skip(INSTALL_HINT)
    if os.geteuid() != 0 and not os.path.isdir("/run/sshd"):
        pytest.skip("sshd needs /run/sshd, which only root can create")
    server = Sshd(tmp_path_factory.mktemp("sshd"), path)
    server.start()
    try:
        probe = subprocess.run(
            ["ssh", "-p", str(server.port), *server.client_options(),
             f"{server.user}@127.0.0.1", "--", "true"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"cannot log in to the test sshd: {probe.stderr.strip()} "
                        f"(sshd: {server.log_tail()})")
        yield server
    finally:
        server.stop()


def _target(server: Sshd, dest: Path) -> SshTarget:
    return parse_ssh_target(f"ssh:{getpass.getuser()}@127.0.0.1:{server.port}:{dest}")


def test_sshd_migration(sshd: Sshd, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.bin", 3 << 20)
    dest = tmp_path / "dest.bin"
    with RemoteRecv.start(_target(sshd, dest), remote_command=THIS_MULTIFD,
                          recv_args=["--timeout", "30"], timeout=30,
                          ssh_options=sshd.client_options()) as remote:
        assert remote.uri.host == "127.0.0.1" and remote.uri.port > 0
        send = spawn(["send", "--json", "--timeout", "30", str(src), "--to", str(remote.uri)])
        assert send.wait() == 0, send.stderr
        assert send.last()["event"] == "completed"
        assert remote.wait(60) == 0
        remote.relay_failure()
        assert remote.final_event is not None
        assert remote.final_event["event"] == "completed"
        assert remote.final_event["digest"] == send.last()["digest"]
    assert sha256(src) == sha256(dest)


def test_sshd_remote_failure_is_relayed(sshd: Sshd, tmp_path: Path) -> None:
    dest = tmp_path / "no-such-dir" / "dest.bin"
    with pytest.raises(RemoteRecvFailed) as info:
        RemoteRecv.start(_target(sshd, dest), remote_command=THIS_MULTIFD,
                         recv_args=["--timeout", "30"], timeout=30,
                         ssh_options=sshd.client_options())
    assert info.value.exit_code == EXIT_USAGE
    assert "does not exist" in str(info.value)
    assert "\n" not in str(info.value)


def test_sshd_auth_failure(sshd: Sshd, tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed) as info:
        RemoteRecv.start(_target(sshd, tmp_path / "dest.bin"), remote_command=THIS_MULTIFD,
                         recv_args=[], timeout=30,
                         ssh_options=sshd.client_options(sshd.wrong_key))
    assert not isinstance(info.value, RemoteRecvFailed)
    assert info.value.exit_code == EXIT_CONNECTION
    message = str(info.value)
    assert message.startswith("ssh to 127.0.0.1 failed: ")
    assert "Permission denied" in message
    assert "\n" not in message
    assert not (tmp_path / "dest.bin").exists()


def test_cli_send_to_ssh_target(sshd: Sshd, tmp_path: Path) -> None:
    """`multifd send SRC --to ssh:USER@HOST:PORT:DEST` starts recv there and migrates."""
    src = write_random(tmp_path / "src.bin", 3 << 20)
    dest = tmp_path / "dest-cli.bin"
    ssh = "ssh " + " ".join(shlex.quote(o) for o in sshd.client_options())
    target = f"ssh:{getpass.getuser()}@127.0.0.1:{sshd.port}:{dest}"
    send = spawn(["send", "--json", "--timeout", "30", str(src), "--to", target,
                  "--ssh", ssh, "--remote-command", THIS_MULTIFD])
    assert send.wait() == 0, send.stderr
    assert send.last()["event"] == "completed"
    assert sha256(src) == sha256(dest)


def test_cli_relays_the_remote_exit_code(sshd: Sshd, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.bin", 1 << 20)
    dest = tmp_path / "exists.bin"
    dest.write_bytes(b"old")
    ssh = "ssh " + " ".join(shlex.quote(o) for o in sshd.client_options())
    target = f"ssh:{getpass.getuser()}@127.0.0.1:{sshd.port}:{dest}"
    send = spawn(["send", "--json", "--timeout", "30", str(src), "--to", target,
                  "--ssh", ssh, "--remote-command", THIS_MULTIFD])
    assert send.wait() == EXIT_USAGE, send.stderr  # the remote refused an existing DEST
    assert "--force" in send.stderr
    assert dest.read_bytes() == b"old"
