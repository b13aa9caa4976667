"""Unit tests of the pure parts: sizes, URIs, tables, the paged client, the tracker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd_cli.common.tables import SharedTable, chunk_pages, table_digest, zero_hash
from multifd_cli.config import parse_rate, parse_size
from multifd_cli.errors import UsageError
from multifd_cli.net.transport import Uri, parse_uri
from multifd_cli.send.clients import PagedClient
from multifd_cli.send.tracker import DirtyLog, HashTracker, SourceTables

PS = 4096


# -- sizes and URIs ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want",
    [("4096", 4096), ("4K", 4096), ("512K", 512 << 10), ("1M", 1 << 20), ("1G", 1 << 30),
     ("1KB", 1000), ("2MB", 2_000_000), ("1.5K", 1536), ("4k", 4096), ("0", 0)],
)
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "K", "-1", "4X", "1.3", "ten", "4 KiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_parse_rate_takes_per_second() -> None:
    assert parse_rate("100M/s") == parse_rate("100M") == 100 << 20
    assert parse_rate("1GB/s") == 10**9


@pytest.mark.parametrize(
    "text,want",
    [("tcp:127.0.0.1:0", Uri("tcp", "127.0.0.1", 0)),
     ("tcp:host.example:4444", Uri("tcp", "host.example", 4444)),
     ("tcp:[::1]:5", Uri("tcp", "::1", 5)),
     ("unix:/run/x.sock", Uri("unix", path="/run/x.sock"))],
)
def test_parse_uri(text: str, want: Uri) -> None:
    assert parse_uri(text) == want
    assert str(parse_uri(text)) == text


@pytest.mark.parametrize(
    "text", ["", "tcp", "tcp:", "tcp:host", "tcp:host:x", "tcp:host:70000", "udp:h:1",
             "tcp::1:5", "tcp:[::1]5", "tcp::5"],
)
def test_parse_uri_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_uri(text)


# -- shared tables ------------------------------------------------------------------------------
def test_shared_table_grows_and_a_forked_child_sees_it() -> None:
    t = SharedTable("t", "Q", 4, fill=7)
    assert list(t.view[:4]) == [7, 7, 7, 7]
    pid = os.fork()
    if pid == 0:
        t.refresh()
        t.view[2] = 42
        os._exit(0)
    os.waitpid(pid, 0)
    assert t.view[2] == 42
    t.ensure(100)
    assert t.capacity >= 100 and t.view[99] == 7 and t.view[2] == 42
    t.close()


def test_table_digest_covers_sizes_and_hashes() -> None:
    a = SharedTable("a", "Q", 2)
    a.view[0], a.view[1] = 1, 2
    d1 = table_digest([(2 * PS, a, PS)])
    d2 = table_digest([(2 * PS - 1, a, PS)])  # same pages, another size
    a.view[1] = 3
    d3 = table_digest([(2 * PS, a, PS)])
    assert len({d1, d2, d3}) == 3
    a.close()


# -- the paged client -------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.packets: list[tuple[int, list[int], list[int], list[int], bytes]] = []

    def send_pages(self, block: int, normal: list[int], zero: list[int], hashes: list[int],
                   payload: list[memoryview | bytes]) -> None:
        self.packets.append((block, list(normal), list(zero), list(hashes),
                             b"".join(bytes(p) for p in payload)))


def test_paged_client_splits_runs_at_the_packet_size_and_flushes_the_rest() -> None:
    rec = Recorder()
    c = PagedClient(rec, PS, 4)
    data = bytes(range(256)) * (6 * PS // 256)
    c.queue_run(0, 0, memoryview(data), list(range(6)))
    assert len(rec.packets) == 1 and c.pending == 2
    c.flush()
    assert [p[1] for p in rec.packets] == [[0, PS, 2 * PS, 3 * PS], [4 * PS, 5 * PS]]
    assert b"".join(p[4] for p in rec.packets) == data
    assert [p[3] for p in rec.packets] == [[0, 1, 2, 3], [4, 5]]
    c.flush()
    assert len(rec.packets) == 2  # nothing left: flush sends nothing


def test_paged_client_detach_copies_out_of_a_reused_buffer() -> None:
    rec = Recorder()
    c = PagedClient(rec, PS, 8)
    buf = bytearray(b"a" * PS)
    c.queue_page(0, 0, memoryview(buf), 1)
    c.detach()
    buf[:] = b"b" * PS
    c.flush()
    assert rec.packets[0][4] == b"a" * PS


def test_paged_client_never_mixes_blocks_in_a_packet() -> None:
    rec = Recorder()
    c = PagedClient(rec, PS, 8)
    c.queue_zero(0, 0)
    c.queue_zero(1, 0)
    c.flush()
    assert [(p[0], p[2]) for p in rec.packets] == [(0, [0]), (1, [0])]


def test_paged_client_zero_runs_fill_packets_like_single_zero_pages() -> None:
    one, bulk = Recorder(), Recorder()
    a, b = PagedClient(one, PS, 8), PagedClient(bulk, PS, 8)
    for c in (a, b):
        c.queue_page(0, 0, memoryview(b"p" * PS), 7)
    for off in range(PS, 21 * PS, PS):
        a.queue_zero(0, off)
    b.queue_zeros(0, range(PS, 21 * PS, PS))
    a.flush()
    b.flush()
    assert bulk.packets == one.packets
    assert [len(p[1]) + len(p[2]) for p in bulk.packets] == [8, 8, 5]


def test_tracker_whole_zero_chunks_are_described_not_sent(tmp_path: Path) -> None:
    cp = chunk_pages(PS)
    path = tmp_path / "f"
    data = bytearray(os.urandom(4 * cp * PS))
    data[cp * PS : 3 * cp * PS] = bytes(2 * cp * PS)  # two whole zero chunks
    data[3 * cp * PS + 5 * PS : 3 * cp * PS + 6 * PS] = bytes(PS)  # and one zero page
    data[5] = 0  # a page that starts with zeros is not a zero page
    path.write_bytes(data)
    tables = SourceTables.create("z", len(data), PS)
    rec, res = scan(path, tables, full=True)
    zero = sorted(o for p in rec.packets for o in p[2])
    assert zero == [*range(cp * PS, 3 * cp * PS, PS), 3 * cp * PS + 5 * PS]
    assert res.zero_pages == 2 * cp + 1 and res.dirty_pages == 4 * cp - res.zero_pages
    # The page table holds the zero hash there, so an unchanged rescan sends nothing.
    rec, res = scan(path, tables, full=False)
    assert rec.packets == []
    assert tables.page_hash.view[cp] == xxhash.xxh3_64_intdigest(bytes(PS))
    tables.close()


# -- the hash tracker ---------------------------------------------------------------------------------
def scan(path: Path, tables: SourceTables, full: bool, size: int | None = None) -> tuple[Recorder, object]:
    rec = Recorder()
    client = PagedClient(rec, PS, 128)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.path.getsize(path) if size is None else size
        n = (size + PS - 1) // PS
        res = HashTracker(PS, lambda: None).scan(fd, 0, tables, 0, n, size, full, client)
        client.flush()
    finally:
        os.close(fd)
    return rec, res


def test_tracker_full_pass_then_only_changes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytearray(os.urandom(40 * PS + 100))
    data[8 * PS : 9 * PS] = bytes(PS)  # one zero page
    path.write_bytes(data)
    tables = SourceTables.create("t", len(data), PS)
    rec, res = scan(path, tables, full=True)
    assert (res.dirty_pages, res.zero_pages) == (40, 1)  # 41 pages, the tail is short
    sent = {off: h for p in rec.packets for off, h in zip(p[1], p[3])}
    assert sent[40 * PS] == xxhash.xxh3_64_intdigest(bytes(data[40 * PS :]))
    # Nothing changed: nothing to send.
    rec, res = scan(path, tables, full=False)
    assert (res.dirty_pages, res.zero_pages, rec.packets) == (0, 0, [])
    # One page changed, one page turned to zero.
    with open(path, "r+b") as f:
        f.seek(3 * PS)
        f.write(b"x" * 10)
        f.seek(20 * PS)
        f.write(bytes(PS))
    rec, res = scan(path, tables, full=False)
    assert [p[1] for p in rec.packets] == [[3 * PS]]
    assert [p[2] for p in rec.packets] == [[20 * PS]]
    assert rec.packets[0][4] == bytes(path.read_bytes()[3 * PS : 4 * PS])


def test_tracker_describes_holes_without_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    size = 64 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(32 << 20)
        f.write(b"data")
    tables = SourceTables.create("t", size, PS)
    rec, res = scan(path, tables, full=True)
    assert res.dirty_pages == 1
    assert res.zero_pages == size // PS - 1
    assert res.read_bytes <= 2 << 20  # only around the data, not 64 MiB


def test_tracker_short_read_is_the_end_not_zeros(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10 * PS))
    tables = SourceTables.create("t", 20 * PS, PS)
    rec, res = scan(path, tables, full=True, size=20 * PS)  # told 20 pages, file has 10
    assert res.short_read
    assert res.dirty_pages == 10 and res.zero_pages == 0
    assert tables.chunk_valid.view[0] == 0 or chunk_pages(PS) > 20


def test_zero_hash_is_the_hash_of_zeros() -> None:
    assert zero_hash(PS) == xxhash.xxh3_64_intdigest(bytes(PS))
    assert zero_hash(100) != zero_hash(PS)


def test_dirty_log_marks_chunks_and_hands_them_over_once() -> None:
    log = DirtyLog(PS)
    cb = chunk_pages(PS) * PS
    log.mark_dirty(0, 1)
    log.mark_dirty(cb - 1, 2)  # straddles chunks 0 and 1
    log.mark_dirty(10 * cb, 0)  # empty: ignored
    assert log.pending_bytes() == 2 * cb
    assert log.take() == {0: [0, 1]}
    assert log.take() == {} and log.pending_bytes() == 0


def test_shell_completion_script_and_answers() -> None:
    """Completion is click's: the documented variable prints a script and completes options."""
    import subprocess
    import sys

    env = {**os.environ, "_MULTIFD_COMPLETE": "bash_source"}
    script = subprocess.run([sys.executable, "-m", "multifd_cli"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert script.returncode == 0 and "_multifd_completion" in script.stdout
    env = {**os.environ, "_MULTIFD_COMPLETE": "bash_complete",
           "COMP_WORDS": "multifd send --comp", "COMP_CWORD": "2"}
    answer = subprocess.run([sys.executable, "-m", "multifd_cli"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert "--compress" in answer.stdout


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.sampled_from("zrp"), min_size=1, max_size=300),
    tail=st.integers(min_value=0, max_value=PS - 1),
)
def test_tracker_full_pass_describes_every_page_once_and_records_its_hash(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], tail: int
) -> None:
    """Zero pages (z), random pages (r), pages that are zero but for one byte (p),
    over several reads of the tracker's buffer, with a short last page."""
    cp = chunk_pages(PS)
    pages = [bytes(PS) if k == "z" else os.urandom(PS) if k == "r" else bytes(PS - 1) + b"x"
             for k in kinds * (1 + 300 // len(kinds))][: 300]
    data = b"".join(pages)[: len(pages) * PS - tail]
    path = tmp_path_factory.mktemp("t") / "f"
    path.write_bytes(data)
    tables = SourceTables.create("p", len(data), PS)
    rec, res = scan(path, tables, full=True)
    sent = [(o, h) for p in rec.packets for o, h in zip(p[1], p[3])]
    zero = [o for p in rec.packets for o in p[2]]
    n = len(pages)
    assert sorted([o for o, _ in sent] + zero) == [i * PS for i in range(n)]
    for o, h in sent:
        assert h == xxhash.xxh3_64_intdigest(data[o : o + PS])
    for o in zero:
        assert not any(data[o : o + PS])
    for i in range(n):
        assert tables.page_hash.view[i] == xxhash.xxh3_64_intdigest(data[i * PS : (i + 1) * PS])
    for c in range(-(-n // cp)):
        chunk = data[c * cp * PS : (c + 1) * cp * PS]
        assert tables.chunk_hash.view[c] == xxhash.xxh3_64_intdigest(chunk)
        assert tables.chunk_valid.view[c] == 1
    assert (res.dirty_pages, res.zero_pages) == (len(sent), len(zero))
    assert b"".join(p[4] for p in rec.packets) == b"".join(data[o : o + PS] for o, _ in sent)
    tables.close()


# -- main <-> channel messages ---------------------------------------------------------------------
def test_channel_messages_are_per_work_item_not_per_page() -> None:
    """Pickling stays off the hot path: one Work and one Done per work item, each a
    few dozen bytes, and a work item covers thousands of pages. A 1 GiB pass on 4
    channels takes 128 items, so 256 small messages, not 262,144 per-page ones."""
    import pickle
    from types import SimpleNamespace

    from multifd_cli.events import Stats
    from multifd_cli.send import messages as M
    from multifd_cli.send.passes import ITEM_BYTES, Blocks, PassRunner
    from multifd_cli.send.state import MigrationState

    blocks = Blocks([SimpleNamespace()], [], PS, 512 << 10)  # type: ignore[list-item]
    state = MigrationState(Stats(), 300.0, sizes=[1 << 30])
    pool = SimpleNamespace(count=4)
    runner = PassRunner(blocks, pool, None, state, None, None, None, None,  # type: ignore[arg-type]
                        lambda: 0)
    items = runner.work_items(full=True)
    assert len(items) == (1 << 30) // ITEM_BYTES == 128
    assert min(end - start for _, start, end in items) == ITEM_BYTES // PS  # 2048 pages each
    work = M.Work(127, 1, 0, 260096, 262144, 1 << 30, True, False)
    done = M.Done(127, 2048, 0, ITEM_BYTES, ITEM_BYTES, 0.01, False)
    assert len(pickle.dumps(work)) < 128 and len(pickle.dumps(done)) < 128
    assert pickle.loads(pickle.dumps(work)) == work


def test_channel_messages_are_typed_once_per_direction() -> None:
    import typing

    from multifd_cli.send import messages as M

    to_channel = set(typing.get_args(M.ToChannel))
    from_channel = set(typing.get_args(M.FromChannel))
    assert to_channel == {M.Work, M.TreeWork, M.Forget, M.TreeDigest, M.Flush, M.SendBlob, M.Sync}
    assert from_channel == {M.Ready, M.Done, M.BlobSent, M.TreeDigested, M.Flushed, M.Synced}
    for cls in to_channel | from_channel:
        assert issubclass(cls, tuple) and cls.__doc__, cls  # NamedTuples, each documented


# -- the writer's safety rules, without processes -----------------------------------------------------
def _guard(after_success: str = "keep-paused") -> tuple[Any, list[str]]:
    from multifd_cli.writer.guard import WriterGuard
    from multifd_cli.writer.pause import Pauser, PauseSpec

    calls: list[str] = []
    pauser = Pauser(PauseSpec(), extra_pause=lambda: calls.append("pause"),
                    extra_resume=lambda: calls.append("resume"))
    return WriterGuard(PauseSpec(), after_success, pauser), calls


def test_writer_guard_resumes_the_writer_on_failure() -> None:
    guard, calls = _guard()
    with pytest.raises(RuntimeError), guard:
        guard.pause()
        raise RuntimeError("the final pass failed")
    assert calls == ["pause", "resume"] and not guard.pauser.paused
    guard.release()  # a second release is harmless
    assert calls == ["pause", "resume"]


@pytest.mark.parametrize(("after_success", "paused"), [("keep-paused", True), ("resume", False)])
def test_writer_guard_after_success(after_success: str, paused: bool) -> None:
    guard, calls = _guard(after_success)
    with guard:
        guard.pause()
        guard.succeeded = True
    assert guard.pauser.paused is paused
    assert calls == (["pause"] if paused else ["pause", "resume"])


def test_transport_is_chosen_once_from_the_parsed_destination() -> None:
    from multifd_cli.config import SendConfig
    from multifd_cli.send.transports import (
        ImageTransport,
        PeerTransport,
        SshTransport,
        open_transport,
    )

    def kind(to: str) -> type:
        return type(open_transport(SendConfig.create(("src",), to), lambda msg: None))

    assert kind("tcp:127.0.0.1:9") is PeerTransport
    assert kind("unix:/run/x.sock") is PeerTransport
    assert kind("ssh:host:/dest") is SshTransport
    assert kind("file:/tmp/x.img") is ImageTransport


# -- a tree's page-table digest ------------------------------------------------------------------
def test_tree_digest_cannot_match_when_a_file_was_never_read() -> None:
    """send covers every file of its final walk: one whose pages never came (no pass
    read it) must change send's digest, or a zero-filled copy would verify."""
    from multifd_cli.common.tables import FileTables, page_hash

    ps = 4096
    recv = FileTables()
    send = FileTables()
    for t in (send, recv):
        e = t.entry(3)
        e[0] = 5000
        e.extend([page_hash(b"a" * ps), page_hash(b"b" * 904)])
    sizes = {3: 5000, 7: 0}
    assert send.digest(ps, files=[(3, 5000), (7, 0)]) == recv.digest(ps, sizes.get)
    # file 8 holds 10 bytes at the end but no pass read it: recv never heard of it
    assert send.digest(ps, files=[(3, 5000), (7, 0), (8, 10)]) != recv.digest(ps, sizes.get)
