"""Kernel dirty tracking for unmodified writers: tracefs events instead of a hash scan."""

from multifd_cli.send.ktrace.safety import SourceStat, grown_range, rescan_reason
from multifd_cli.send.ktrace.tracker import KernelTracker, PassWindow, available

__all__ = ["KernelTracker", "PassWindow", "SourceStat", "available", "grown_range", "rescan_reason"]
