"""A --pause-cmd: SIGSTOP PID, wait until every thread of it shows state T, copy SRC to COPY.

Usage: python stop_and_snapshot.py PID SRC COPY

COPY is then the source exactly as the switchover sees it. The script prints a line
on stdout and one on stderr on purpose: send must keep command output off its stdout.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

from multifd_cli.writer.pause import is_stopped


def main() -> None:
    pid, src, copy = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    print(f"stop_and_snapshot: stopping {pid}", flush=True)
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not is_stopped(pid):
        if time.monotonic() > deadline:
            sys.exit(f"process {pid} did not stop")
        time.sleep(0.001)
    shutil.copyfile(src, copy)
    print(f"stop_and_snapshot: copied {src}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
