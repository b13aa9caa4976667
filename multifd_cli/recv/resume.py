"""--resume: hash the old copy DEST holds, before the first epoch.

The channels hash it range by range; main streams each range's hashes to the
source in page order as soon as they are known, so the source starts comparing
before the whole file is hashed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Sequence

from multifd_cli import wire as P
from multifd_cli.common.tables import pages_of
from multifd_cli.net.connection import MainConnection
from multifd_cli.proc import workers
from multifd_cli.recv import messages as M
from multifd_cli.recv.sink import DestTables

log = logging.getLogger("multifd")
IN_FLIGHT = 2  # ranges per channel: one hashing, one queued behind it


def hash_old_copy(
    main: MainConnection,
    channels: Sequence[workers.Worker],
    table: DestTables,
    size: int,
    page_size: int,
    heartbeat: float,
) -> list[P.Message]:
    """Hash block 0 as DEST holds it and send RESUME_HASHES; return what the
    main connection said meanwhile (the first epoch may already begin)."""
    early: list[P.Message] = []
    n = pages_of(size, page_size)
    step = min(P.MAX_RESUME_HASHES, max(1, (8 << 20) // page_size))
    ranges = deque((s, min(n, s + step)) for s in range(0, n, step))
    done: dict[int, int] = {}
    outstanding = [0] * len(channels)
    sent_upto = 0
    t0 = time.monotonic()
    while sent_upto < n:
        for w in channels:
            while ranges and outstanding[w.index] < IN_FLIGHT:
                start, end = ranges.popleft()
                w.send(M.HashRange(0, start, end, size))
                outstanding[w.index] += 1
        reports, ready = workers.poll(channels, [main], min(heartbeat, 0.25))
        for w, r in reports:
            if isinstance(r, M.Hashed):
                outstanding[w.index] -= 1
                done[r.start] = r.end
        while sent_upto in done:
            end = done.pop(sent_upto)
            view = table.page_hash.view
            main.send(P.ResumeHashes(0, sent_upto, tuple(view[sent_upto:end])))
            sent_upto = end
        if ready:
            early.extend(main.read_available())
        main.heartbeat_if_idle(heartbeat)
    log.info("hashed the old copy (%d pages) in %.0f ms", n, (time.monotonic() - t0) * 1000)
    return early
