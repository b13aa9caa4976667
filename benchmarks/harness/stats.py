"""Numbers for the tables: sizes, medians with their spread, and per-pair ratios
(the only comparison the bench reports, since single times are noise here).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from harness import GiB, KiB, MiB, Sample


def parse_size(text: str) -> int:
    """'1G', '256M', '512K' (powers of 1024) or a plain byte count."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": KiB, "M": MiB, "G": GiB}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human_size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:.{digits}f}"


def spread(xs: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'median (min-max)'."""
    if not xs:
        return "-"
    return (f"{fmt(med(xs) * scale, digits)} ({fmt(min(xs) * scale, digits)}"
            f"–{fmt(max(xs) * scale, digits)})")


@dataclass
class RatioStats:
    """Per-pair ratios a[i] / b[i]; `below` counts pairs where a < b."""

    ratios: list[float]

    @property
    def median(self) -> float:
        return med(self.ratios)

    @property
    def below(self) -> int:
        return sum(r < 1 for r in self.ratios)

    def text(self, digits: int = 2) -> str:
        if not self.ratios:
            return "-"
        return (f"{self.median:.{digits}f} ({min(self.ratios):.{digits}f}–"
                f"{max(self.ratios):.{digits}f})")

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "per_pair": self.ratios}


def ratio(a: Sequence[float], b: Sequence[float]) -> RatioStats:
    return RatioStats([x / y for x, y in zip(a, b) if y > 0])


def secs(samples: Sequence[Sample], key: str = "s") -> list[float]:
    return [float(x[key]) for x in samples]
