"""What a person sees on a terminal: the progress bar, log lines, the summary's units.

The bar is checked under a real pseudo-terminal (pexpect), and what reaches the
screen is replayed through a small terminal model, so a log record glued to the
end of a progress line shows up exactly as a user would see it.
"""

from __future__ import annotations

from multifd_cli.events import Stats, human_summary


def test_the_summary_gives_throughput_in_the_progress_units() -> None:
    """MiB/s, as on the progress display; JSON keeps QEMU's megabits (mbps)."""
    stats = Stats(transferred_bytes=300 << 20, started=0.0, finished=2.0)
    summary = stats.summary()
    assert summary["mbps"] == round((300 << 20) * 8 / 2 / 1e6, 2)
    text = human_summary("send", "completed", summary)
    assert "throughput: 150.0 MiB/s" in text, text
    assert "mbps" not in text, text
