"""Tests for multifd_cli.compression.

Like numcodecs' tests/common.py, the codec checks are plain functions taking a
Compressor class (`check_*`), run for every registered codec, third-party ones
found through entry points included, and for a dummy plugin registered here.
"""

from __future__ import annotations

import email
import inspect
import json
import logging
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
from typing import Any, Callable, ClassVar, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd_cli.compression import (
    Buffer,
    CompressionSpec,
    Compressor,
    by_wire_id,
    compressor_class,
    get_compressor,
    names,
    parse_spec,
    register,
    registry,
    unregister,
)
from multifd_cli.errors import EXIT_USAGE, ProtocolError, UsageError

KIB = 1024
SIZES = [0, 1, 4 * KIB, 512 * KIB]
BUILTINS = {"none": 0, "zlib": 1, "lz4": 2, "zstd": 3}


def _text_corpus(size: int) -> bytes:
    """Real-world text: the source of the json and email packages, repeated to `size`."""
    files = sorted(
        p for m in (json, email) for p in pathlib.Path(inspect.getfile(m)).parent.glob("*.py")
    )
    src = b"".join(p.read_bytes() for p in files)
    return (src * (size // len(src) + 1))[:size]


TEXT = _text_corpus(max(SIZES))
RANDOM = os.urandom(max(SIZES))
DATA: dict[str, Callable[[int], bytes]] = {
    "random": lambda n: RANDOM[:n],
    "text": lambda n: TEXT[:n],
    "zero": bytes,
}


def _levels(cls: type[Compressor]) -> dict[str, int]:
    return {"min": cls.min_level, "default": cls.default_level, "max": cls.max_level}


# --- the shared checks ------------------------------------------------------------------------
def check_roundtrip(cls: type[Compressor], level: int, kind: str) -> None:
    c = cls(level)
    for size in SIZES:
        data = DATA[kind](size)
        for buf in (data, bytearray(data), memoryview(data)):
            unit = c.compress(buf)
            assert isinstance(unit, bytes)
            out = c.decompress(unit, size)
            assert type(out) is bytes, (kind, size)
            assert out == data, (kind, size)
        # a memoryview payload, as the packet parser hands it over
        assert c.decompress(memoryview(b"xx" + unit)[2:], size) == data


def check_independent_units(cls: type[Compressor]) -> None:
    """Each unit decodes alone, in any order, by any instance: no history across calls."""
    c = cls()
    a, b, a2 = TEXT[: 64 * KIB], TEXT[64 * KIB : 128 * KIB], TEXT[: 64 * KIB]
    ua, ub, ua2 = c.compress(a), c.compress(b), c.compress(a2)
    assert ua == ua2  # compressing the same data again gives the same unit
    assert cls().decompress(ub, len(b)) == b
    assert cls().decompress(ua, len(a)) == a
    d = cls()
    assert d.decompress(ub, len(b)) == b
    assert d.decompress(ua, len(a)) == a
    assert d.decompress(ub, len(b)) == b


def check_wrong_raw_size(cls: type[Compressor]) -> None:
    c = cls()
    for kind in DATA:
        for size in (0, 1, 4 * KIB):
            unit = c.compress(DATA[kind](size))
            for wrong in (size - 1, size + 1, size * 2 + 7):
                with pytest.raises(ProtocolError):
                    c.decompress(unit, wrong)


def _outcome(c: Compressor, data: Buffer, raw_size: int) -> bytes | None:
    """Decode hostile input: exactly raw_size bytes or ProtocolError, nothing else."""
    try:
        out = c.decompress(data, raw_size)
    except ProtocolError:
        return None
    assert type(out) is bytes
    assert len(out) == raw_size
    return out


def check_corrupt_input(cls: type[Compressor]) -> None:
    c = cls()
    for kind in DATA:
        for size in (1, 4 * KIB):
            data = DATA[kind](size)
            unit = c.compress(data)
            # truncated, or with trailing garbage: always an error
            for bad in (unit[:-1], unit[: len(unit) // 2], unit[:1], b""):
                if bad != unit:
                    with pytest.raises(ProtocolError):
                        c.decompress(bad, size)
            for tail in (b"\x00", os.urandom(7), unit):
                with pytest.raises(ProtocolError):
                    c.decompress(unit + tail, size)
            # a flipped bit: an error, or (without a checksum) wrong bytes of the right size
            for i in range(0, len(unit), max(1, len(unit) // 300)):
                flipped = bytearray(unit)
                flipped[i] ^= 1 << (i % 8)
                _outcome(c, bytes(flipped), size)
    for n in (1, 2, 9, 100, 5000):
        garbage = os.urandom(n)
        for size in (0, 1, n, 4 * KIB, 64 * KIB):
            _outcome(c, garbage, size)


def check_bomb(cls: type[Compressor]) -> None:
    """64 MiB of zeros announced as 4 KiB (or 0) fails fast without allocating the 64 MiB."""
    c = cls()
    bomb = c.compress(bytes(64 << 20))
    for raw_size in (4 * KIB, 0):  # 0: zlib's max_length=0 would mean "no limit"
        tracemalloc.start()
        try:
            start = time.perf_counter()
            with pytest.raises(ProtocolError):
                c.decompress(bomb, raw_size)
            elapsed = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, f"peak {peak} bytes while decoding a {raw_size}-byte unit"
        assert elapsed < 2.0


def check_pickle(cls: type[Compressor]) -> None:
    """A compressor can be sent to a channel's worker process."""
    c = cls(cls.max_level)
    c2 = pickle.loads(pickle.dumps(c))
    assert type(c2) is cls and c2.level == c.level
    assert c2.decompress(c.compress(TEXT[:5000]), 5000) == TEXT[:5000]


def run_shared_checks(cls: type[Compressor]) -> None:
    for level in sorted(set(_levels(cls).values())):
        for kind in DATA:
            check_roundtrip(cls, level, kind)
    check_independent_units(cls)
    check_wrong_raw_size(cls)
    check_corrupt_input(cls)
    check_bomb(cls)
    check_pickle(cls)


# --- every registered codec, entry-point plugins included -------------------------------------
ALL = names()


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("which", ["min", "default", "max"])
@pytest.mark.parametrize("name", ALL)
def test_roundtrip(name: str, which: str, kind: str) -> None:
    cls = compressor_class(name)
    check_roundtrip(cls, _levels(cls)[which], kind)


@pytest.mark.parametrize("name", ALL)
def test_units_independent(name: str) -> None:
    check_independent_units(compressor_class(name))


@pytest.mark.parametrize("name", ALL)
def test_wrong_raw_size(name: str) -> None:
    check_wrong_raw_size(compressor_class(name))


@pytest.mark.parametrize("name", ALL)
def test_corrupt_input(name: str) -> None:
    check_corrupt_input(compressor_class(name))


@pytest.mark.parametrize("name", ALL)
def test_bomb(name: str) -> None:
    check_bomb(compressor_class(name))


@pytest.mark.parametrize("name", ALL)
def test_pickle(name: str) -> None:
    check_pickle(compressor_class(name))


@pytest.mark.parametrize("name", ALL)
def test_negative_raw_size(name: str) -> None:
    with pytest.raises(ProtocolError, match="got -1, expected >= 0"):
        compressor_class(name)().decompress(b"", -1)


def _mutated_units() -> st.SearchStrategy[bytes]:
    """Near-valid input: a real unit of some codec, cut, extended or with a byte changed."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        codec = compressor_class(draw(st.sampled_from(ALL)))()
        start = draw(st.integers(0, len(TEXT) - 1))
        unit = bytearray(codec.compress(TEXT[start : start + draw(st.integers(0, 2000))]))
        op = draw(st.sampled_from(["cut", "extend", "change", "none"]))
        if op == "cut" and unit:
            del unit[draw(st.integers(0, len(unit) - 1)) :]
        elif op == "extend":
            unit += draw(st.binary(max_size=16))
        elif op == "change" and unit:
            unit[draw(st.integers(0, len(unit) - 1))] = draw(st.integers(0, 255))
        return bytes(unit)

    return build()


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(st.binary(max_size=4096), _mutated_units()),
    raw_size=st.one_of(st.integers(0, 65536), st.integers(0, 2100)),
)
def test_decompress_any_input(name: str, data: bytes, raw_size: int) -> None:
    _outcome(compressor_class(name)(), data, raw_size)


# --- codec specifics ---------------------------------------------------------------------------
def test_zstd_lying_frame_header() -> None:
    """A frame that declares 4 KiB but holds 64 MiB is refused without decoding it all."""
    zstd = get_compressor("zstd")
    unit = bytearray(zstd.compress(bytes(64 << 20)))
    assert unit[4] >> 6 == 2  # frame header: 4-byte content size after the window byte
    unit[6:10] = struct.pack("<I", 4 * KIB)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            zstd.decompress(bytes(unit), 4 * KIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_zstd_content_size_checked_first() -> None:
    zstd = get_compressor("zstd")
    with pytest.raises(ProtocolError, match="content size: got 65536, expected 4096"):
        zstd.decompress(zstd.compress(bytes(65536)), 4096)


def test_zstd_rejects_second_frame() -> None:
    zstd = get_compressor("zstd")
    unit = zstd.compress(TEXT[:100])
    with pytest.raises(ProtocolError):
        zstd.decompress(unit + zstd.compress(b""), 100)


def test_zlib_rejects_trailing_stream() -> None:
    z = get_compressor("zlib")
    with pytest.raises(ProtocolError, match="after the end"):
        z.decompress(z.compress(TEXT[:100]) + z.compress(b""), 100)


@pytest.mark.parametrize("name", [n for n in BUILTINS if compressor_class(n).has_levels()])
def test_levels_matter(name: str) -> None:
    """The level reaches the library: the highest level beats the lowest on text."""
    cls = compressor_class(name)
    text = TEXT[: 64 * KIB]
    best = len(cls(cls.max_level).compress(text))
    assert best < len(cls(cls.min_level).compress(text))
    assert best < len(cls(cls.min_level + 1).compress(text))  # lz4: HC 1 vs HC 12
    assert str(cls(cls.max_level)) == f"{name}:{cls.max_level}"


def test_lz4_levels_select_mode() -> None:
    fast, hc = get_compressor("lz4:0"), get_compressor("lz4:9")
    assert len(hc.compress(TEXT[: 64 * KIB])) < len(fast.compress(TEXT[: 64 * KIB]))


def test_none_is_identity() -> None:
    c = get_compressor("none")
    assert c.compress(memoryview(b"abc")) == b"abc"
    with pytest.raises(ProtocolError, match="got 3, expected 4"):
        c.decompress(b"abc", 4)


@pytest.mark.parametrize(
    ("blocked", "spec", "package"),
    [(("zstandard",), "zstd", "zstandard"), (("lz4", "lz4.block"), "lz4:3", "lz4")],
)
def test_missing_optional_dependency(
    monkeypatch: pytest.MonkeyPatch, blocked: tuple[str, ...], spec: str, package: str
) -> None:
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    assert parse_spec(spec)  # parsing needs no library
    with pytest.raises(UsageError, match=f"pip install {package}$"):
        get_compressor(spec)


def test_import_is_lazy() -> None:
    """Importing and parsing must not import lz4 or zstandard (CLI start-up time)."""
    code = (
        "import sys, multifd_cli.compression as c\n"
        "c.names(); c.parse_spec('zstd:3'); c.parse_spec('lz4'); c.get_compressor('zlib')\n"
        "print(sorted(m for m in ('zstandard', 'lz4') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- spec parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "name", "level", "effective", "canonical"),
    [
        ("zstd", "zstd", None, 1, "zstd"),
        ("zstd:3", "zstd", 3, 3, "zstd:3"),
        ("zstd:22", "zstd", 22, 22, "zstd:22"),
        ("none", "none", None, 0, "none"),
        ("lz4:0", "lz4", 0, 0, "lz4:0"),
        ("lz4", "lz4", None, 0, "lz4"),
        ("lz4:12", "lz4", 12, 12, "lz4:12"),
        ("zlib", "zlib", None, 1, "zlib"),
        ("zlib:0", "zlib", 0, 0, "zlib:0"),
        (" ZSTD:+3 ", "zstd", 3, 3, "zstd:3"),
    ],
)
def test_parse_spec_valid(
    text: str, name: str, level: int | None, effective: int, canonical: str
) -> None:
    spec = parse_spec(text)
    assert spec == CompressionSpec(name, level)
    assert spec.effective_level == effective
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec
    c = get_compressor(spec)
    assert (c.name, c.level) == (name, effective)
    assert get_compressor(text).level == effective


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "unknown compression '': expected one of none, zlib, lz4, zstd"),
        ("gzip", "unknown compression 'gzip': expected one of none, zlib, lz4, zstd"),
        ("gzip:3", "unknown compression 'gzip'"),
        ("zstd:30", "zstd level 30 is out of range 1..22"),
        ("zstd:0", "zstd level 0 is out of range 1..22"),
        ("zstd:-1", "zstd level -1 is out of range 1..22"),
        ("lz4:13", "lz4 level 13 is out of range 0..12"),
        ("zlib:10", "zlib level 10 is out of range 0..9"),
        ("zlib:99999999999", "is not an integer"),
        ("zstd:", "compression level '' is not an integer (expected zstd:1..22)"),
        ("zstd:x", "compression level 'x' is not an integer"),
        ("zstd:1.5", "is not an integer"),
        ("zstd:3:4", "is not an integer"),
        ("zstd:٣", "is not an integer"),  # a non-ASCII digit
        ("none:5", "compression 'none' takes no level, got 'none:5'"),
        ("none:0", "takes no level"),
    ],
)
def test_parse_spec_invalid(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_spec(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


def test_get_compressor_checks_spec_objects() -> None:
    with pytest.raises(UsageError, match="zstd level 30 is out of range 1..22"):
        get_compressor(CompressionSpec("zstd", 30))
    with pytest.raises(UsageError, match="unknown compression 'nope'"):
        get_compressor(CompressionSpec("nope", None))
    with pytest.raises(UsageError, match="out of range"):
        compressor_class("zlib")(-1)


# --- wire ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "wire_id"), list(BUILTINS.items()))
def test_by_wire_id(name: str, wire_id: int) -> None:
    assert names()[: len(BUILTINS)] == list(BUILTINS)
    c = by_wire_id(wire_id)
    assert (c.name, c.wire_id, c.level) == (name, wire_id, type(c).default_level)
    assert by_wire_id(wire_id, type(c).max_level).level == type(c).max_level
    assert type(get_compressor(name)) is type(c)


def test_by_wire_id_unknown() -> None:
    with pytest.raises(ProtocolError) as info:
        by_wire_id(9)
    assert str(info.value).startswith("compression id: got 9, expected one of 0, 1, 2, 3")


def test_auto_is_a_registry_entry_that_no_packet_can_name() -> None:
    """auto is looked up like any codec, but by_wire_id never returns it."""
    from multifd_cli import wire as P
    from multifd_cli.compression.adaptive import Auto

    spec = parse_spec(" AUTO ")
    assert spec == CompressionSpec("auto") and spec.adaptive and spec.label == "auto"
    assert compressor_class("auto") is Auto
    assert spec.wire_id == Auto.wire_id == P.COMPRESSION_AUTO  # CONFIG's marker, one number
    assert "auto" not in names()
    with pytest.raises(ProtocolError, match="compression id: got 127"):
        by_wire_id(P.COMPRESSION_AUTO)
    for wire_id in range(256):  # whatever a packet header says, never the policy
        try:
            assert not by_wire_id(wire_id).adaptive
        except ProtocolError:
            pass
    with pytest.raises(UsageError, match="takes no level"):
        parse_spec("auto:3")
    with pytest.raises(UsageError, match="built in"):
        unregister("auto")
    policy = get_compressor("auto")
    assert isinstance(policy, Auto)
    assert [o.codec.name if o.codec else "none" for o in policy.policy().options] == [
        "none", "lz4", "zstd"]


def test_spec_labels_match_the_completed_event() -> None:
    assert [parse_spec(t).label for t in ("none", "zstd", "zstd:5", "lz4", "zlib:9")] == [
        "none", "zstd:1", "zstd:5", "lz4:0", "zlib:9"]


def test_by_wire_id_bad_level_is_the_peers_fault() -> None:
    with pytest.raises(ProtocolError, match="zstd compression level: got 30, expected 1..22"):
        by_wire_id(3, 30)
    assert by_wire_id(0, 0).name == "none"


# --- plugins ------------------------------------------------------------------------------------
class ReverseCompressor(Compressor):
    """A dummy third-party codec: the bytes, reversed. Levels exist but change nothing."""

    name: ClassVar[str] = "reverse-test"
    wire_id: ClassVar[int] = 200
    min_level: ClassVar[int] = 0
    max_level: ClassVar[int] = 2
    default_level: ClassVar[int] = 1

    def compress(self, data: Buffer) -> bytes:
        return bytes(data)[::-1]

    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        if len(data) != raw_size:  # check before copying: a bomb costs nothing
            raise ProtocolError(f"reverse payload: got {len(data)} bytes, expected {raw_size}")
        return bytes(data)[::-1]


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore the registry (and the plugins-loaded flag) after the test."""
    with registry.isolated():
        yield


def test_dummy_plugin_passes_shared_checks(clean_registry: None) -> None:
    assert register(ReverseCompressor) is ReverseCompressor
    assert register(ReverseCompressor) is ReverseCompressor  # idempotent
    assert "reverse-test" in names()
    assert parse_spec("reverse-test:2") == CompressionSpec("reverse-test", 2)
    assert type(get_compressor("reverse-test")) is ReverseCompressor
    assert by_wire_id(200).name == "reverse-test"
    run_shared_checks(compressor_class("reverse-test"))
    assert unregister("reverse-test") is ReverseCompressor
    assert "reverse-test" not in names()
    with pytest.raises(ProtocolError):
        by_wire_id(200)


def _plugin(name: str, wire_id: int, **attrs: Any) -> type[Compressor]:
    return type(name, (ReverseCompressor,), {"name": name, "wire_id": wire_id, **attrs})


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_plugin("zstd", 201), "name 'zstd' is already registered"),
        (_plugin("other", 3), "wire id 3 is out of range 128..255"),
        (_plugin("other", 256), "wire id 256 is out of range 128..255"),
        (_plugin("other", 127), "out of range 128..255"),
        (_plugin("a:b", 201), "must be lower case"),
        (_plugin("Upper", 201), "must be lower case"),
        (_plugin("lv", 201, default_level=5), "levels min 0 <= default 5 <= max 2"),
        (_plugin("lv", 201, max_level=300), "within -128..127"),
        (int, "is not a Compressor subclass"),
    ],
)
def test_register_refuses(clean_registry: None, cls: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        register(cls)


def test_register_refuses_duplicate_id(clean_registry: None) -> None:
    register(ReverseCompressor)
    with pytest.raises(UsageError, match="wire id 200 is already used by 'reverse-test'"):
        register(_plugin("another", 200))


def test_unregister_refuses(clean_registry: None) -> None:
    with pytest.raises(UsageError, match="built in"):
        unregister("zstd")
    with pytest.raises(UsageError, match="not registered"):
        unregister("nope")


class _FakeEntryPoint:
    def __init__(self, name: str, load: Callable[[], Any]) -> None:
        self.name, self.value, self._load = name, f"fake:{name}", load

    def load(self) -> Any:
        return self._load()


def _raise(exc: Exception) -> Callable[[], Any]:
    def load() -> Any:
        raise exc

    return load


def test_entry_point_plugins(
    clean_registry: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    eps = [
        _FakeEntryPoint("reverse-test", lambda: ReverseCompressor),
        _FakeEntryPoint("broken", _raise(ImportError("No module named 'brotli'"))),
        _FakeEntryPoint("crashy", _raise(RuntimeError("boom"))),
        _FakeEntryPoint("notaclass", lambda: len),
        _FakeEntryPoint("misnamed", lambda: _plugin("something-else", 210)),
        _FakeEntryPoint("clash", lambda: _plugin("clash", 2)),
        _FakeEntryPoint("dupe", lambda: _plugin("dupe", 200)),
    ]
    calls = []

    def fake_entry_points(group: str) -> list[_FakeEntryPoint]:
        calls.append(group)
        return eps

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    registry.forget_plugins()
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert names() == ["none", "zlib", "lz4", "zstd", "reverse-test"]
        names()
    assert calls == ["multifd_cli.compressors"]  # loaded once, lazily
    skipped = {r.getMessage().split("'")[1] for r in caplog.records}
    assert skipped == {"broken", "crashy", "notaclass", "misnamed", "clash", "dupe"}
    assert any("boom" in r.getMessage() for r in caplog.records)
    assert by_wire_id(200).name == "reverse-test"


def test_entry_point_listing_failure_is_not_fatal(
    clean_registry: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_entry_points(group: str) -> list[Any]:
        raise OSError("bad metadata")

    monkeypatch.setattr(registry, "entry_points", failing_entry_points)
    registry.forget_plugins()
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert names()[:4] == list(BUILTINS)
    assert "bad metadata" in caplog.text


def test_real_entry_point_lookup() -> None:
    """The importlib.metadata call itself works on this Python."""
    assert all(hasattr(ep, "load") for ep in registry.entry_points(registry.ENTRY_POINT_GROUP))


# -- the incompressibility probe ------------------------------------------------------------------
def test_probe_tells_random_segments_from_text_and_zeros() -> None:
    from multifd_cli.compression.probe import incompressible_segments

    seg = 64 * 1024
    data = os.urandom(seg) + _text_corpus(seg) + bytes(seg) + os.urandom(seg // 2)
    for name in ("lz4", "zstd:1", "zlib"):
        assert incompressible_segments(get_compressor(name), data, seg) == [
            True, False, False, True], name


@pytest.mark.parametrize("kinds", [
    ["text", "random", "text", "random", "random", "text", "text", "random"],
    ["random"] * 8,  # nothing left to compress: one raw packet, zero pages included
])
def test_channel_sends_incompressible_segments_raw_and_the_rest_compressed(
    kinds: list[str],
) -> None:
    """Pages of segments whose probe did not shrink go in a raw packet of their own;
    every page arrives once, with its hash, and the bytes decode to the original."""
    import socket
    import threading

    from multifd_cli import wire as P
    from multifd_cli.compression.probe import PROBE_PAGES
    from multifd_cli.send.channel import ChannelSender
    from multifd_cli.send.ratelimit import SharedRateLimit

    ps, seg = 4096, 4096 * PROBE_PAGES
    data = b"".join(_text_corpus(seg) if k == "text" else os.urandom(seg) for k in kinds)
    n = len(data) // ps
    offsets = [i * ps for i in range(n)]
    hashes = [i + 1 for i in range(n)]  # the channel does not look at them
    a, b = socket.socketpair()
    dec = P.Decoder()

    def drain() -> None:
        while chunk := b.recv(1 << 20):
            dec.feed(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        tx = ChannelSender(a, get_compressor("lz4"), SharedRateLimit(0))
        tx.send_pages(0, offsets, [n * ps], hashes, [memoryview(data)])
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
        packets = [m for m in dec.messages() if isinstance(m, P.Packet)]
    finally:
        a.close()
        b.close()
    expect = [(0, 2), (P.FLAG_RAW, 2)] if "text" in kinds else [(P.FLAG_RAW, 2)]
    assert [(p.header.flags & P.FLAG_RAW, p.header.compression) for p in packets] == expect
    assert [list(p.zero_offsets) for p in packets] == [[n * ps]] + [[]] * (len(expect) - 1)
    assert tx.epoch_counts == P.Counts(len(expect), n, 1)
    got = {}
    for p in packets:
        raw = len(p.normal_offsets) * ps
        body = bytes(p.payload) if p.header.flags & P.FLAG_RAW else by_wire_id(2).decompress(
            p.payload, raw)
        for j, (off, h) in enumerate(zip(p.normal_offsets, p.hashes)):
            got[off] = (body[j * ps : (j + 1) * ps], h)
        kind = "random" if p.header.flags & P.FLAG_RAW else "text"
        assert {kinds[off // seg] for off in p.normal_offsets} == {kind}
    assert sorted(got) == offsets
    assert all(got[o] == (data[o : o + ps], o // ps + 1) for o in offsets)
