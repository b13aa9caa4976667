"""The pieces every benchmark module shares: paths, units, the sample type and the
error that fails one case without stopping the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
REPO = HERE.parent
RESULTS = HERE / "results"
WRITER = REPO / "examples" / "writer.py"
NAIVE = HERE / "naive.py"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
REST_S = 2.5
INSTALL_HINT = "apt-get install socat rsync zstd"
Sample = dict[str, Any]


class BenchError(Exception):
    """A run failed; the case is reported as failed and the next case runs."""
