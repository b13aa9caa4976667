"""The package's shape, checked from its source with `ast` so that it stays true.

Each rule is a checker that takes a `Package` (parsed sources by module name) and
returns the offenders as readable strings. The tests run every checker twice: on
multifd_cli/ itself, where it must find nothing, and on a small synthetic package
that breaks the rule, where it must find exactly that (a checker that cannot fail
checks nothing). Tests and benchmarks are not held to these limits.

Every import counts wherever it stands: at the top, inside a function (the lazy
imports that keep start-up cheap) or under ``if TYPE_CHECKING:``, because each is a
dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1] / "multifd_cli"
PKG = "multifd_cli"

MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 400
# Twenty is what one concern needs: its settings, a few collaborators and its own
# state. Past that a class keeps several concerns at once, and every method can touch
# every field, so no change stays local (the Orchestrator that prompted this rule held
# 46 for its transports, control server, throttle, progress and estimator).
MAX_CLASS_ATTRIBUTES = 20

SANS_IO_FORBIDDEN = {"socket", "select", "ssl", "multiprocessing", "threading", "subprocess"}
BELOW_SIDES = ("wire", "compression", "common")
SIDE_AND_ABOVE = ("net", "send", "recv", "writer", "proc", "image")
TOP = (f"{PKG}.cli", f"{PKG}.api")
ENTRY = (*TOP, f"{PKG}.__main__")


# -- the parsed package --------------------------------------------------------------------------


@dataclass
class Module:
    name: str
    path: str  # relative to the package, for messages
    is_pkg: bool
    source: str
    tree: ast.Module = field(init=False)

    def __post_init__(self) -> None:
        self.tree = ast.parse(self.source, self.path)

    @property
    def folder(self) -> str:
        """`wire` for multifd_cli.wire.codec, `cli` for multifd_cli.cli, '' for the root."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""

    @property
    def package(self) -> str:
        """What a relative import of level 1 starts from."""
        return self.name if self.is_pkg else self.name.rpartition(".")[0]


@dataclass
class Import:
    """One imported name, resolved: `module` is absolute, `name` is None for `import m`."""

    module: str
    name: str | None
    line: int


class Package:
    def __init__(self, files: dict[str, str]) -> None:
        """`files` maps a path relative to the package (``wire/codec.py``) to its source."""
        self.modules: dict[str, Module] = {}
        for rel, source in sorted(files.items()):
            parts = rel[: -len(".py")].split("/")
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            name = ".".join([PKG, *parts])
            self.modules[name] = Module(name, rel, is_pkg, source)

    @classmethod
    def from_disk(cls, root: Path = ROOT) -> Package:
        return cls({p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*.py")})

    def __iter__(self) -> Iterator[Module]:
        return iter(self.modules.values())

    def resolve(self, mod: Module, node: ast.ImportFrom) -> str:
        """The absolute module a `from ... import` statement reads from."""
        base = node.module or ""
        if not node.level:
            return base
        anchor = mod.package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        return ".".join([*anchor, base] if base else anchor)

    def imports(self, mod: Module) -> list[Import]:
        """Every import statement of `mod`, anywhere in it, made absolute."""
        out: list[Import] = []
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                out += [Import(a.name, None, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = self.resolve(mod, node)
                out += [Import(base, a.name, node.lineno) for a in node.names]
        return out

    def targets(self, mod: Module) -> list[tuple[str, int]]:
        """The package modules `mod` depends on, with the line of each import.
        `from pkg import sub` names the submodule; `from pkg import thing` the package.
        The parent packages that Python runs first are not counted: a package's
        __init__ that re-exports its submodules would otherwise put every submodule
        that imports a sibling in a cycle with it."""
        out = []
        for imp in self.imports(mod):
            if imp.name is not None and f"{imp.module}.{imp.name}" in self.modules:
                out.append((f"{imp.module}.{imp.name}", imp.line))
            elif imp.module in self.modules:
                out.append((imp.module, imp.line))
        return out

    def module_names(self, mod: Module) -> dict[str, str]:
        """Local names that an import binds to a module (``import a.b as c``,
        ``from a import b``, and the root of ``import a.b``), to that module's name."""
        bound: dict[str, str] = {}
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    root = a.name.split(".")[0]
                    bound[a.asname or root] = a.name if a.asname else root
            elif isinstance(node, ast.ImportFrom):
                base = self.resolve(mod, node)
                for a in node.names:
                    if f"{base}.{a.name}" in self.modules:
                        bound[a.asname or a.name] = f"{base}.{a.name}"
        return bound

    def classes(self) -> Iterator[tuple[Module, ast.ClassDef]]:
        for mod in self:
            for node in ast.walk(mod.tree):
                if isinstance(node, ast.ClassDef):
                    yield mod, node


def where(mod: Module, line: int) -> str:
    return f"{PKG}/{mod.path}:{line}"


def in_folder(name: str, folder: str) -> bool:
    return name == f"{PKG}.{folder}" or name.startswith(f"{PKG}.{folder}.")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# -- the checkers -------------------------------------------------------------------------------


def long_modules(pkg: Package) -> list[str]:
    return [f"{PKG}/{m.path} has {n} lines (limit {MAX_MODULE_LINES})"
            for m in pkg if (n := len(m.source.splitlines())) > MAX_MODULE_LINES]


def long_classes(pkg: Package) -> list[str]:
    out = []
    for mod, cls in pkg.classes():
        n = (cls.end_lineno or cls.lineno) - cls.lineno + 1
        if n > MAX_CLASS_LINES:
            out.append(f"class {cls.name} ({where(mod, cls.lineno)}) has {n} lines "
                       f"(limit {MAX_CLASS_LINES})")
    return out


def own_attributes(cls: ast.ClassDef) -> set[str]:
    """Fields declared in the class body, plus every `self.x` (or `cls.x`) that any
    method stores to, through any assignment form."""
    names: set[str] = set()
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            names.add(stmt.target.id)
        elif isinstance(stmt, ast.Assign):
            names |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*stmt.args.posonlyargs, *stmt.args.args]
            static = any(isinstance(d, ast.Name) and d.id == "staticmethod"
                         for d in stmt.decorator_list)
            if not args or static:
                continue
            me = args[0].arg
            for node in walk_skipping_classes(stmt):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name) and node.value.id == me):
                    names.add(node.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def walk_skipping_classes(fn: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, except that a class defined inside `fn` is its own class."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))


def attributes(pkg: Package, mod: Module, cls: ast.ClassDef,
               seen: frozenset[str] = frozenset()) -> set[str]:
    """own_attributes plus those of its bases inside the package: a mixin moves fields
    to another file, but the object still holds them all."""
    names = own_attributes(cls)
    local = {n.name: n for n in ast.walk(mod.tree) if isinstance(n, ast.ClassDef)}
    imported = {}
    for imp in pkg.imports(mod):
        if imp.name is not None and imp.module in pkg.modules:
            imported[imp.name] = pkg.modules[imp.module]
    for base in cls.bases:
        if not isinstance(base, ast.Name) or base.id in seen:
            continue
        if base.id in local and local[base.id] is not cls:
            names |= attributes(pkg, mod, local[base.id], seen | {cls.name})
        elif base.id in imported:
            home = imported[base.id]
            found = [n for n in home.tree.body if isinstance(n, ast.ClassDef) and n.name == base.id]
            if found:
                names |= attributes(pkg, home, found[0], seen | {cls.name})
    return names


ENUM_BASES = {"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag"}


def crowded_classes(pkg: Package) -> list[str]:
    out = []
    for mod, cls in pkg.classes():
        # An enum's members are its values, not state that its methods share.
        if any((dotted_name(b) or "").rpartition(".")[2] in ENUM_BASES for b in cls.bases):
            continue
        names = attributes(pkg, mod, cls)
        if len(names) > MAX_CLASS_ATTRIBUTES:
            out.append(f"class {cls.name} ({where(mod, cls.lineno)}) holds {len(names)} "
                       f"attributes (limit {MAX_CLASS_ATTRIBUTES}): {', '.join(sorted(names))}")
    return out


def private_imports(pkg: Package) -> list[str]:
    """Our own modules' underscore names used from another module. The standard
    library's (``os._exit``) are documented interfaces and are not in question."""
    out = []
    for mod in pkg:
        for imp in pkg.imports(mod):
            path = imp.module if imp.name is None else f"{imp.module}.{imp.name}"
            if foreign_private(pkg, mod, path):
                what = path if imp.name is None else f"{imp.name} from {imp.module}"
                out.append(f"{where(mod, imp.line)} imports {what}")
        bound = pkg.module_names(mod)
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                dotted = dotted_name(node.value)
                if dotted is None or dotted.split(".")[0] not in bound:
                    continue
                head, _, rest = dotted.partition(".")
                target = ".".join(filter(None, [bound[head], rest]))
                if target in pkg.modules and foreign_private(pkg, mod, f"{target}.{node.attr}"):
                    out.append(f"{where(mod, node.lineno)} uses {target}.{node.attr}")
    return out


def foreign_private(pkg: Package, mod: Module, path: str) -> bool:
    """Whether `path` (a dotted module or name of the package) reaches into something
    private that is not `mod`'s own: a private name belongs to its module alone, a
    private module to the package that holds it."""
    parts = path.split(".")
    if parts[0] != PKG:
        return False
    for i, part in enumerate(parts):
        if is_private(part):
            owner = ".".join(parts[:i])
            if ".".join(parts[: i + 1]) in pkg.modules:
                return not (mod.name == owner or mod.name.startswith(owner + "."))
            return mod.name != owner
    return False


def dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted_name(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def sans_io_wire(pkg: Package) -> list[str]:
    out = []
    for mod in pkg:
        if mod.folder != "wire":
            continue
        for imp in pkg.imports(mod):
            names = [imp.module] if imp.module else []
            if imp.name is not None:
                names.append(f"{imp.module}.{imp.name}")
            if any(n.split(".")[0] in SANS_IO_FORBIDDEN for n in names):
                what = imp.module if imp.name is None else f"{imp.name} from {imp.module}"
                out.append(f"{where(mod, imp.line)} imports {what}")
    return out


def compression_alone(pkg: Package) -> list[str]:
    out = []
    for mod in pkg:
        if mod.folder != "compression":
            continue
        for target, line in pkg.targets(mod):
            if not (in_folder(target, "compression") or target == f"{PKG}.errors"):
                out.append(f"{where(mod, line)} imports {target}")
        for imp in pkg.imports(mod):  # `from multifd_cli import x`, x not a module
            if imp.module == PKG and f"{PKG}.{imp.name}" not in pkg.modules:
                out.append(f"{where(mod, imp.line)} imports {imp.name} from {PKG}")
    return out


def sides_apart(pkg: Package) -> list[str]:
    out = []
    for mod in pkg:
        other = {"send": "recv", "recv": "send"}.get(mod.folder)
        if other is None:
            continue
        for target, line in pkg.targets(mod):
            if in_folder(target, other):
                out.append(f"{where(mod, line)} ({mod.folder}/) imports {target}")
    return out


def layering(pkg: Package) -> list[str]:
    out = []
    for mod in pkg:
        for target, line in pkg.targets(mod):
            if mod.folder in BELOW_SIDES and (
                    any(in_folder(target, f) for f in SIDE_AND_ABOVE) or target in TOP):
                out.append(f"{where(mod, line)} ({mod.folder}/) imports {target}")
            elif mod.name not in ENTRY and target in TOP:
                out.append(f"{where(mod, line)} imports {target}, which is above it")
    return out


def import_cycles(pkg: Package) -> list[str]:
    """Strongly connected groups of the module graph (Tarjan), each one a cycle."""
    graph = {m.name: sorted({t for t, _ in pkg.targets(m) if t != m.name}) for m in pkg}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return [f"import cycle: {' <-> '.join(g)}" for g in sorted(groups)]


Checker = Callable[[Package], list[str]]
CHECKERS: dict[str, Checker] = {
    "long_modules": long_modules,
    "long_classes": long_classes,
    "crowded_classes": crowded_classes,
    "private_imports": private_imports,
    "sans_io_wire": sans_io_wire,
    "compression_alone": compression_alone,
    "sides_apart": sides_apart,
    "layering": layering,
    "import_cycles": import_cycles,
}


# -- the package as it is --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> Package:
    return Package.from_disk()


def test_package_was_found(package: Package) -> None:
    assert f"{PKG}.cli" in package.modules and f"{PKG}.wire.codec" in package.modules


@pytest.mark.parametrize("rule", CHECKERS)
def test_package_keeps_the_rule(package: Package, rule: str) -> None:
    offenders = CHECKERS[rule](package)
    assert not offenders, f"{rule}:\n" + "\n".join(offenders)


# -- every checker can fail ------------------------------------------------------------------------


def _fields(n: int, prefix: str = "f") -> str:
    return "".join(f"        self.{prefix}{i} = {i}\n" for i in range(n))


VIOLATIONS: dict[str, tuple[dict[str, str], list[str]]] = {
    "long_modules": (
        {"big.py": "x = 1\n" * (MAX_MODULE_LINES + 1), "small.py": "x = 1\n" * MAX_MODULE_LINES},
        ["multifd_cli/big.py has 701 lines"],
    ),
    "long_classes": (
        {"m.py": "class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES
                 + "class Fits:\n" + "    x = 1\n" * (MAX_CLASS_LINES - 1)},
        ["class Big (multifd_cli/m.py:1) has 401 lines"],
    ),
    "crowded_classes": (
        {
            # 10 fields in a mixin + 11 of its own: the mixin does not split anything.
            "send/mixin.py": "class Mixin:\n    def a(self):\n" + _fields(10, "m"),
            "send/big.py": "from multifd_cli.send.mixin import Mixin\n"
                           "class Big(Mixin):\n    x: int\n    def b(self):\n"
                           + _fields(8) + "        self.t, (self.u, self.v) = 1, (2, 3)\n",
            # 20 distinct, each stored twice, plus a nested class that is its own class.
            "send/kinds.py": "import enum\nclass Kind(enum.IntEnum):\n"
                             + "".join(f"    K{i} = {i}\n" for i in range(30)),
            "send/fits.py": "class Fits:\n    def a(self):\n" + _fields(20) + _fields(20)
                            + "        class Inner:\n            def c(me):\n"
                            + _fields(5, "g").replace("        ", "                ")
                            .replace("self.", "me.") + "                self.z = 1\n",
        },
        ["class Big (multifd_cli/send/big.py:2) holds 22 attributes"],
    ),
    "private_imports": (
        {
            "net/transport.py": "_stale = 1\ndef _helper(): pass\n",
            "net/control.py": "from multifd_cli.net.transport import _stale\n",
            "net/ssh.py": "def f():\n    from multifd_cli.net import transport\n"
                          "    return transport._helper()\n",
            "net/auth.py": "import multifd_cli.net.transport as t\nimport os\n"
                           "x = t.__name__\nos._exit\nclass A:\n    def f(self):\n"
                           "        return self._x\n",
            "net/handshake.py": "import multifd_cli.net.transport\n"
                                "y = multifd_cli.net.transport._stale\n",
            # A private module is its package's own: net/ may use it, send/ may not.
            "net/_impl.py": "from multifd_cli.net.transport import x\n",
            "net/connection.py": "from multifd_cli.net._impl import f\n"
                                 "from multifd_cli.net import _impl\nimport multifd_cli.net._impl\n",
            "send/channel.py": "import multifd_cli.net._impl\n",
            "send/clients.py": "from multifd_cli.net._impl import f\n",
        },
        ["multifd_cli/net/control.py:1 imports _stale from multifd_cli.net.transport",
         "multifd_cli/net/handshake.py:2 uses multifd_cli.net.transport._stale",
         "multifd_cli/net/ssh.py:3 uses multifd_cli.net.transport._helper",
         "multifd_cli/send/channel.py:1 imports multifd_cli.net._impl",
         "multifd_cli/send/clients.py:1 imports f from multifd_cli.net._impl"],
    ),
    "sans_io_wire": (
        {
            "wire/codec.py": "import struct\ndef f():\n    import socket\n",
            "wire/states.py": "from multiprocessing.connection import Connection\n",
            "net/transport.py": "import socket\n",
        },
        ["multifd_cli/wire/codec.py:3 imports socket",
         "multifd_cli/wire/states.py:1 imports Connection from multiprocessing.connection"],
    ),
    "compression_alone": (
        {
            "errors.py": "", "events.py": "", "compression/__init__.py": "",
            "compression/base.py": "from multifd_cli.errors import X\n"
                                   "from multifd_cli.compression import base\n"
                                   "from . import registry\n",
            "compression/registry.py": "def f():\n    from multifd_cli import events\n",
            "compression/auto.py": "from ..events import Events\n",
        },
        ["multifd_cli/compression/auto.py:1 imports multifd_cli.events",
         "multifd_cli/compression/registry.py:2 imports multifd_cli.events"],
    ),
    "sides_apart": (
        {
            "send/__init__.py": "", "recv/__init__.py": "", "common/tables.py": "",
            "send/channel.py": "from multifd_cli.common import tables\n"
                               "def f():\n    from multifd_cli.recv import sink\n",
            "recv/sink.py": "import multifd_cli.send\n",
        },
        ["multifd_cli/recv/sink.py:1 (recv/) imports multifd_cli.send",
         "multifd_cli/send/channel.py:3 (send/) imports multifd_cli.recv.sink"],
    ),
    "layering": (
        {
            "cli.py": "import multifd_cli.api\n", "api.py": "from multifd_cli import cli\n",
            "__main__.py": "from multifd_cli.cli import main\n",
            "net/transport.py": "", "common/fsutil.py": "from multifd_cli.net import transport\n",
            "wire/codec.py": "from multifd_cli.common import fsutil\n",
            "send/tracker.py": "def f():\n    from multifd_cli.api import x\n",
        },
        ["multifd_cli/common/fsutil.py:1 (common/) imports multifd_cli.net.transport",
         "multifd_cli/send/tracker.py:2 imports multifd_cli.api, which is above it"],
    ),
    "import_cycles": (
        {
            "a.py": "import multifd_cli.b\n", "b.py": "def f():\n    from multifd_cli import c\n",
            "c.py": "from .a import x\n", "d.py": "import multifd_cli.a\nimport multifd_cli.d\n",
        },
        ["import cycle: multifd_cli.a <-> multifd_cli.b <-> multifd_cli.c"],
    ),
}


def test_every_checker_has_a_violation() -> None:
    assert set(VIOLATIONS) == set(CHECKERS)


@pytest.mark.parametrize("rule", VIOLATIONS)
def test_checker_reports_a_violation(rule: str) -> None:
    files, expected = VIOLATIONS[rule]
    found = CHECKERS[rule](Package(files))
    assert len(found) == len(expected), "\n".join(found)
    for got, want in zip(sorted(found), expected):
        assert got.startswith(want), f"{got!r} does not start with {want!r}"
