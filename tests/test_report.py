"""`multifd report`: the picture of a real live migration, checked against its events.

A real send migrates a file that a real writer keeps dirtying, with --json on
both sides; the report is drawn from those event files through the real CLI, and
its figure's data is compared with the events, pass by pass.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.mfdkit import MULTIFD, Proc, Runner, write_random

pytest.importorskip("matplotlib")

from multifd_cli.report import load_run  # noqa: E402
from multifd_cli.report.draw import draw  # noqa: E402

MiB = 1 << 20


def save(events: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MULTIFD, "report", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Proc, Proc]:
    """One live migration for the whole module: a writer at ~24 MiB/s on a 32 MiB file,
    sent at 40 MiB/s with --auto-converge, so it takes several passes, throttles, and
    switches over with the writer paused."""
    from helpers.mfdkit import Writer

    tmp = tmp_path_factory.mktemp("live")
    src = write_random(tmp / "src", 32 * MiB)
    runner = Runner(tmp)
    w = Writer(src, rate="24M", hot="16M")
    try:
        m = runner.migrate(src, tmp / "dest", send_args=(
            "--pause-pid", str(w.pid), "--max-bandwidth", "40M", "--auto-converge",
            "--downtime-limit", "50", "--timeout", "30"))
        assert m.wait() == (0, 0), (m.send.stderr, m.recv.stderr)
    finally:
        w.kill()
        runner.cleanup()
    return save(m.send.events, tmp / "send.jsonl"), save(m.recv.events, tmp / "recv.jsonl"), \
        m.send, m.recv


def close(a: list[float | None], b: list[float | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y))
        for x, y in zip(a, b))


@pytest.mark.parametrize("ext", ["png", "svg", "html"])
def test_the_cli_writes_each_format(live_run: tuple[Path, Path, Proc, Proc], tmp_path: Path,
                                    ext: str) -> None:
    send_file, recv_file, _, _ = live_run
    out = tmp_path / f"run.{ext}"
    done = report(str(send_file), str(recv_file), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""
    data = out.read_bytes()
    if ext == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    elif ext == "svg":
        assert b"<svg" in data[:1000] and b"Bytes per pass" in data
    else:
        page = data.decode()
        assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
        assert page.count("<tr") == 1 + len([1 for ln in send_file.read_text().splitlines()
                                              if '"event": "pass"' in ln])


def test_the_figure_plots_every_pass_with_the_run_values(
        live_run: tuple[Path, Path, Proc, Proc]) -> None:
    send_file, recv_file, send, recv = live_run
    passes = send.of("pass")
    done = send.of("completed")[0]
    assert len(passes) == done["passes"] >= 3, passes  # a run worth drawing
    assert any(p["throttle_pct"] > 0 for p in passes), passes  # --auto-converge acted

    pic = draw(load_run(str(send_file), str(recv_file)))
    numbers = [p["pass"] for p in passes]
    expect: dict[str, list[float | None]] = {
        "dirty (found by send)": [p["dirty_bytes"] for p in passes],
        "sent (on the wire)": [p["sent_bytes"] for p in passes],
        "bandwidth": [p["bandwidth_bytes_per_s"] / MiB for p in passes],
        "dirty rate": [p["dirty_rate_bytes_per_s"] / MiB for p in passes],
        "expected downtime": [p["expected_downtime_ms"] for p in passes],
        "throttle": [float(p["throttle_pct"]) for p in passes],
    }
    # recv's passes, joined by number (never by ts: two clocks), as per-pass bytes.
    cumulative = [0] + [p["transferred_bytes"] for p in recv.of("pass")]
    expect["received by recv"] = [b - a for a, b in zip(cumulative, cumulative[1:])]
    for label, values in expect.items():
        xs, ys = pic.plotted[label]
        assert xs == numbers, label
        assert close(ys, values), (label, ys, values)
    assert pic.plotted["real downtime"] == ([numbers[-1]], [done["downtime_ms"]])
    switchover = send.of("switchover")[0]
    assert pic.plotted["switchover"][0] == [switchover["pass"]] == [numbers[-1]]

    # ... and those are what the axes hold, not just what was handed over.
    bytes_ax, rates_ax, downtime_ax, throttle_ax = pic.figure.axes
    heights = [bar.get_height() for bar in bytes_ax.patches]
    n = len(numbers)
    assert close(heights[:n], expect["dirty (found by send)"])
    assert close(heights[n:2 * n], expect["sent (on the wire)"])
    lines = {ln.get_label(): ln for ln in rates_ax.get_lines()}
    assert list(lines["bandwidth"].get_xdata()) == numbers
    assert close(list(lines["dirty rate"].get_ydata()), expect["dirty rate"])
    assert close(list(throttle_ax.get_lines()[0].get_ydata()), expect["throttle"])
    assert "downtime" in pic.figure.get_suptitle()


def test_send_events_alone_are_enough(live_run: tuple[Path, Path, Proc, Proc]) -> None:
    send_file, _, send, _ = live_run
    pic = draw(load_run(str(send_file)))
    assert "received by recv" not in pic.plotted
    assert len(pic.plotted["sent (on the wire)"][0]) == len(send.of("pass"))


def test_a_failed_run_is_drawn_too(tmp_path: Path) -> None:
    """Runs that did not converge are the ones worth a picture."""
    base = {"side": "send", "ts": 1.0, "normal_pages": 1, "zero_pages": 0,
            "bandwidth_bytes_per_s": 100 * MiB, "throttle_pct": 0, "final": False}
    events = [
        {**base, "event": "pass", "pass": i, "dirty_bytes": d, "sent_bytes": d,
         "duration_ms": 10.0 * i, "dirty_rate_bytes_per_s": 200 * MiB * (i > 1),
         "remaining_bytes": d, "expected_downtime_ms": None if i == 1 else 80.0}
        for i, d in ((1, 64 * MiB), (2, 60 * MiB))
    ] + [{"event": "failed", "side": "send", "ts": 2.0, "error": "still changing",
          "exit_code": 9}]
    f = save(events, tmp_path / "send.jsonl")
    out = tmp_path / "failed.png"
    done = report(str(f), "-o", str(out))
    assert done.returncode == 0, done.stderr
    pic = draw(load_run(str(f)))
    assert "failed (exit 9): still changing" in pic.figure.get_suptitle()
    assert pic.plotted["expected downtime"] == ([1, 2], [None, 80.0])
    assert "real downtime" not in pic.plotted and "switchover" not in pic.plotted


# -- what goes wrong: one line, exit 2 --------------------------------------------------------


def one_line_usage_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("multifd: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_are_one_line_usage_errors(live_run: tuple[Path, Path, Proc, Proc],
                                              tmp_path: Path) -> None:
    send_file, recv_file, send, recv = live_run
    out = str(tmp_path / "x.png")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"event":"pass","side":"send"}\nhello\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cut = tmp_path / "cut.jsonl"
    cut.write_text(send_file.read_text()[:-40])  # the last line cut short
    typed = save([{**send.of("pass")[0], "sent_bytes": "many"}], tmp_path / "typed.jsonl")
    gap = save([send.of("pass")[0], {**send.of("pass")[1], "pass": 3}], tmp_path / "gap.jsonl")
    other = save([{**e, "digest": "0" * 32} if e["event"] == "completed" else e
                  for e in recv.events], tmp_path / "other.jsonl")
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        ([str(tmp_path / "missing.jsonl")], ("cannot read", "missing.jsonl")),
        ([str(garbage)], ("garbage.jsonl:2", "not a JSON event")),
        ([str(empty)], ("no pass event from send",)),
        ([str(binary)], ("binary.jsonl",)),
        ([str(cut)], ("cut.jsonl:",)),
        ([str(typed)], ("'sent_bytes'", "expected an integer")),
        ([str(gap)], ("pass 3, expected pass 2",)),
        ([str(recv_file)], ("no pass event from send",)),
        ([str(send_file), str(empty)], ("no event from recv",)),
        ([str(send_file), str(other)], ("two different runs",)),
    ]
    for args, words in cases:
        one_line_usage_error(report(*args, "-o", out), *words)
    one_line_usage_error(report(str(send_file), "-o", str(tmp_path / "x.pdf")),
                         "expected a .png, .svg or .html")
    one_line_usage_error(report(str(send_file), "-o", str(tmp_path / "no" / "x.png")),
                         "cannot write")
    assert not Path(out).exists()


def test_without_matplotlib_it_says_what_to_install(
        live_run: tuple[Path, Path, Proc, Proc], tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from multifd_cli.cli import main; main(sys.argv[1:])")
    send_file = live_run[0]
    done = subprocess.run([sys.executable, "-c", code, "report", str(send_file),
                           "-o", str(tmp_path / "x.png")], capture_output=True, text=True,
                          timeout=60)
    one_line_usage_error(done, "needs matplotlib", "pip install 'multifd-cli[report]'")
