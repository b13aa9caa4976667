"""A throwaway OpenSSH server on a loopback port, for tests of `send --to ssh:...`.

Keys (host and client) are made at run time in a temporary directory; the
server accepts only that client key, for the user running the tests.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
INSTALL_HINT = "sshd not installed: apt-get install openssh-server"


def find_sshd() -> str | None:
    """Absolute path of sshd (it insists on one, to re-exec itself), or None."""
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "multifd-test",
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL)
    return path


class Sshd:
    """`sshd -D -e` with its own config, keys, log and pid file under `root`."""

    def __init__(self, root: Path, sshd: str) -> None:
        self.root = root
        self.sshd = sshd
        self.user = getpass.getuser()
        self.host_key = keygen(root / "host_ed25519")
        self.client_key = keygen(root / "client_ed25519")
        self.wrong_key = keygen(root / "wrong_ed25519")
        self.authorized_keys = root / "authorized_keys"
        self.authorized_keys.write_text((root / "client_ed25519.pub").read_text())
        self.authorized_keys.chmod(0o600)
        self.log_path = root / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def client_options(self, key: Path | None = None) -> list[str]:
        """ssh options that trust this server and log in with `key`, non-interactively."""
        return ["-i", str(key or self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-F", "/dev/null"]

    def _config(self) -> Path:
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PermitRootLogin yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "LogLevel VERBOSE\n"
        )
        return config

    def start(self, attempts: int = 3) -> None:
        """Start on a free port (retrying if another process took it); wait for the banner."""
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            config = self._config()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
            if self._wait_banner(10.0):
                return
            self.stop()
            last = self.log_tail()
        raise RuntimeError(f"sshd did not start: {last}")

    def _wait_banner(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
