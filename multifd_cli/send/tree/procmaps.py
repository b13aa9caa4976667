"""Which files some process maps shared and writable.

Stores through a MAP_SHARED, PROT_WRITE mapping change a file's pages without moving
its mtime or ctime (SQLite's -shm, LMDB), so the stat shortcut would skip them. Such
files are scanned every pass. /proc/PID/maps of other users' processes is readable
only as root; without root the answer covers this user's processes only.
"""

from __future__ import annotations

import os


def parse_maps(text: str) -> set[tuple[int, int]]:
    """(dev, ino) of the file mappings in one maps file whose permissions are rw-s.

    The dev field is "major:minor" in hex. On filesystems whose st_dev is not the
    block device's (btrfs subvolumes, overlayfs) it will not equal lstat's st_dev;
    callers that cannot afford a miss match on the inode alone.
    """
    found: set[tuple[int, int]] = set()
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3:4] != "s":
            continue
        ino = int(fields[4])
        if ino == 0:
            continue  # anonymous shared memory
        major, _, minor = fields[3].partition(":")
        found.add((os.makedev(int(major, 16), int(minor, 16)), ino))
    return found


def shared_writable_mapped(proc: str = "/proc") -> set[tuple[int, int]]:
    """(dev, ino) of every file any visible process maps shared and writable now.

    Processes that exit or deny access while being read are skipped: a mapping that
    goes away with its process writes nothing more.
    """
    found: set[tuple[int, int]] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc, pid, "maps")) as f:
                found |= parse_maps(f.read())
        except OSError:
            continue
    return found
