"""Which codecs exist, by name (for the command line) and by wire id (for packets).

Third-party codecs are found through the ``multifd_cli.compressors`` entry-point
group, each entry point naming a Compressor subclass whose ``name`` equals the
entry point's name, e.g. in the plugin's pyproject.toml::

    [project.entry-points."multifd_cli.compressors"]
    brotli = "multifd_brotli:BrotliCompressor"

Plugins must use wire ids 128..255; 0..127 are reserved for multifd itself.
Plugins are loaded lazily, on the first lookup, so start-up stays fast; one that
fails to load is logged and skipped, never fatal. Both ends of a migration must
have the same plugins installed: the wire id, not the name, travels in packets.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Union

from multifd_cli.compression.adaptive import Auto
from multifd_cli.compression.base import (
    LEVEL_MAX,
    LEVEL_MIN,
    PLUGIN_WIRE_ID_MIN,
    WIRE_ID_MAX,
    Compressor,
)
from multifd_cli.compression.codecs import (
    Lz4Compressor,
    NoCompression,
    ZlibCompressor,
    ZstdCompressor,
)
from multifd_cli.errors import ProtocolError, UsageError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "multifd_cli.compressors"

_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]*\Z")
_LEVEL_RE = re.compile(r"[+-]?[0-9]{1,9}\Z")

_lock = threading.RLock()
_by_name: dict[str, type[Compressor]] = {}
_by_id: dict[int, type[Compressor]] = {}
_plugins_loaded = False


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed ``--compress NAME[:LEVEL]``; level None means the codec's default."""

    name: str
    level: int | None = None

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    @property
    def effective_level(self) -> int:
        """The level actually used, with the codec's default filled in (sent in CONFIG)."""
        return compressor_class(self.name).check_level(self.level)

    @property
    def wire_id(self) -> int:
        """The compression byte of CONFIG (auto's marker, or the codec's packet id)."""
        return compressor_class(self.name).wire_id

    @property
    def adaptive(self) -> bool:
        """True for a policy such as auto, which picks a codec per packet."""
        return compressor_class(self.name).adaptive

    @property
    def label(self) -> str:
        """How the completed event names it: "none", "auto", or NAME:LEVEL."""
        if not compressor_class(self.name).has_levels():
            return self.name
        return f"{self.name}:{self.effective_level}"


def _check_class(cls: Any, *, builtin: bool) -> None:
    """Refuse a class whose attributes would break parsing, the wire or the registry."""
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise UsageError(f"compressor {cls!r} is not a Compressor subclass")
    name = getattr(cls, "name", None)
    wire_id = getattr(cls, "wire_id", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(
            f"compressor {cls.__qualname__}: name {name!r} must be lower case letters, "
            "digits, '_', '-' or '.', starting with a letter"
        )
    low = 0 if builtin else PLUGIN_WIRE_ID_MIN
    high = PLUGIN_WIRE_ID_MIN - 1 if builtin else WIRE_ID_MAX
    if isinstance(wire_id, bool) or not isinstance(wire_id, int) or not low <= wire_id <= high:
        raise UsageError(f"compressor {name!r}: wire id {wire_id!r} is out of range {low}..{high}")
    levels = (cls.min_level, cls.default_level, cls.max_level)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in levels) or not (
        LEVEL_MIN <= cls.min_level <= cls.default_level <= cls.max_level <= LEVEL_MAX
    ):
        raise UsageError(
            f"compressor {name!r}: levels min {cls.min_level!r} <= default "
            f"{cls.default_level!r} <= max {cls.max_level!r} must hold, "
            f"within {LEVEL_MIN}..{LEVEL_MAX}"
        )


def _register(cls: type[Compressor], *, builtin: bool) -> type[Compressor]:
    _check_class(cls, builtin=builtin)
    with _lock:
        old = _by_name.get(cls.name)
        if old is cls and (cls.adaptive or _by_id.get(cls.wire_id) is cls):
            return cls  # the same class twice (decorator plus entry point): harmless
        if old is not None:
            raise UsageError(
                f"compressor name {cls.name!r} is already registered by "
                f"{old.__module__}.{old.__qualname__}"
            )
        taken = _by_id.get(cls.wire_id) or next(
            (c for c in _by_name.values() if c.adaptive and c.wire_id == cls.wire_id), None
        )
        if taken is not None:
            raise UsageError(
                f"compressor {cls.name!r}: wire id {cls.wire_id} is already used by {taken.name!r}"
            )
        _by_name[cls.name] = cls
        if not cls.adaptive:  # a policy is chosen by name, never named by a packet
            _by_id[cls.wire_id] = cls
    return cls


def register(cls: type[Compressor]) -> type[Compressor]:
    """Add a third-party codec (wire id 128..255); usable as a class decorator.

    Raises UsageError if the name or wire id is taken or the attributes are invalid.
    """
    return _register(cls, builtin=False)


def unregister(name: str) -> type[Compressor]:
    """Remove a third-party codec again (tests, plugin reloads); built-ins stay."""
    with _lock:
        cls = _by_name.get(name)
        if cls is None:
            raise UsageError(f"compressor {name!r} is not registered")
        if cls.wire_id < PLUGIN_WIRE_ID_MIN:
            raise UsageError(f"compressor {name!r} is built in and cannot be unregistered")
        del _by_name[name]
        _by_id.pop(cls.wire_id, None)
        return cls


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Undo, on exit, every registration made inside, and the plugins-loaded state.

    For tests and plugin reloads: they change the registry without leaking
    those changes into whatever runs next.
    """
    global _plugins_loaded
    with _lock:
        by_name, by_id, loaded = dict(_by_name), dict(_by_id), _plugins_loaded
    try:
        yield
    finally:
        with _lock:
            _by_name.clear()
            _by_name.update(by_name)
            _by_id.clear()
            _by_id.update(by_id)
            _plugins_loaded = loaded


def forget_plugins() -> None:
    """Look the entry points up again on the next lookup (after installing one)."""
    global _plugins_loaded
    with _lock:
        _plugins_loaded = False


def entry_points(group: str) -> Iterable[Any]:
    """The installed entry points of `group`; a test may replace this function."""
    import importlib.metadata as md

    if sys.version_info >= (3, 10):
        return md.entry_points(group=group)
    else:
        return md.entry_points().get(group, ())  # 3.9: a dict of groups


def _load_plugins() -> None:
    """Register the entry-point codecs once; a broken one is logged and skipped."""
    global _plugins_loaded
    with _lock:  # cheap, and lookups happen at set-up time, not per packet
        if _plugins_loaded:
            return
        _plugins_loaded = True  # first, so a plugin that looks up codecs does not recurse
        try:
            eps = list(entry_points(ENTRY_POINT_GROUP))
        except Exception as e:
            log.warning("cannot list compression plugins: %s", e)
            return
        for ep in eps:
            try:
                cls = ep.load()
                if isinstance(cls, type) and getattr(cls, "name", None) != ep.name:
                    raise UsageError(
                        f"entry point name {ep.name!r} differs from the class's name "
                        f"{getattr(cls, 'name', None)!r}"
                    )
                register(cls)
            except Exception as e:
                log.warning("compression plugin %r (%s) skipped: %s", ep.name, ep.value, e)


def names() -> list[str]:
    """Every codec that can name a packet, in wire-id order (built-ins first).

    Policies such as auto are left out: they compress nothing themselves.
    """
    _load_plugins()
    with _lock:
        return [cls.name for _, cls in sorted(_by_id.items())]


def compressor_class(name: str) -> type[Compressor]:
    """The class registered under `name`; UsageError listing the known names otherwise."""
    # Built-ins answer without listing entry points: importlib.metadata costs
    # ~17 ms of start-up, and no plugin can take a built-in's name or id.
    cls = _by_name.get(name)
    if cls is None:
        _load_plugins()
        cls = _by_name.get(name)
    if cls is None:
        raise UsageError(f"unknown compression {name!r}: expected one of {', '.join(names())}")
    return cls


def parse_spec(text: str) -> CompressionSpec:
    """Parse ``NAME`` or ``NAME:LEVEL`` (e.g. "zstd:3"), checking the level's range.

    Checked here, from the class attributes alone, so a bad option fails before
    anything connects and without importing the codec's library.
    """
    name, sep, level_text = text.strip().partition(":")
    name = name.strip().lower()
    cls = compressor_class(name)
    if not sep:
        return CompressionSpec(name)
    if not cls.has_levels():
        raise UsageError(f"compression {name!r} takes no level, got {text.strip()!r}")
    level_text = level_text.strip()
    if not _LEVEL_RE.match(level_text):
        raise UsageError(
            f"compression level {level_text!r} is not an integer "
            f"(expected {name}:{cls.min_level}..{cls.max_level})"
        )
    level = int(level_text)
    cls.check_level(level)
    return CompressionSpec(name, level)


def get_compressor(spec: Union[CompressionSpec, str]) -> Compressor:
    """A ready compressor for a spec or its text; UsageError if unknown, out of range or not installed."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    return compressor_class(spec.name)(spec.level)


def by_wire_id(wire_id: int, level: int | None = None) -> Compressor:
    """The compressor for a peer's packet header or CONFIG.

    The values come off the wire, so an unknown id or an out-of-range level is
    the peer's fault: ProtocolError, not UsageError. A policy (auto) is never
    returned: its id only marks CONFIG, and a packet must name a real codec.
    """
    if wire_id not in _by_id:
        _load_plugins()
    with _lock:
        cls = _by_id.get(wire_id)
        known = ", ".join(str(i) for i in sorted(_by_id))
    if cls is None:
        raise ProtocolError(f"compression id: got {wire_id}, expected one of {known}")
    if level is not None and not cls.min_level <= level <= cls.max_level:
        raise ProtocolError(
            f"{cls.name} compression level: got {level}, expected {cls.min_level}..{cls.max_level}"
        )
    return cls(level)


for _cls in (NoCompression, ZlibCompressor, Lz4Compressor, ZstdCompressor, Auto):
    _register(_cls, builtin=True)
del _cls
