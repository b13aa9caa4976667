"""docs/protocol.md and multifd_cli/wire/ must say the same thing.

The tables of the doc are parsed and compared, both ways, with the module:
constants, message types, struct formats, the header layout and the state
transitions. Change a value in one place only and these tests fail.
"""

from __future__ import annotations

import ast
import re
import struct
from enum import Enum
from pathlib import Path

import pytest

from multifd_cli import wire as P

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

REQUIRED_CONSTANTS = [
    "MAGIC", "VERSION", "ROLE_MAIN", "MAX_CHANNELS", "MIN_PAGE_SIZE", "MAX_PAGE_SIZE",
    "MAX_PACKET_SIZE", "MAX_PAGES_PER_PACKET", "MAX_CONTROL_PAYLOAD", "MAX_BLOCKS",
    "MAX_NAME_LEN", "MAX_BLOCK_SIZE", "MAX_ABORT_MESSAGE", "DIGEST_LEN", "UUID_LEN",
    "FLAG_SYNC", "FLAG_RAW", "HEADER_SIZE",
]
INT_LITERAL = re.compile(r"^(0[xX][0-9a-fA-F]+|0|[1-9][0-9]*)$")


def _cells(line: str) -> list[str]:
    line = line.strip()
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in line[1:-1].split("|")]


def parse_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text`: (header cells, body rows)."""
    tables = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        is_table = (
            lines[i].lstrip().startswith("|")
            and i + 1 < len(lines)
            and re.fullmatch(r"\s*\|(\s*:?-{3,}:?\s*\|)+\s*", lines[i + 1])
        )
        if not is_table:
            i += 1
            continue
        header = _cells(lines[i])
        rows = []
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            row = _cells(lines[i])
            assert len(row) == len(header), f"row {row} does not fit header {header}"
            rows.append(row)
            i += 1
        tables.append((header, rows))
    return tables


def table(columns: list[str], text: str | None = None) -> list[dict[str, str]]:
    """The one table whose header is `columns`, as dicts; cell backticks removed."""
    found = [rows for header, rows in parse_tables(text or DOC.read_text()) if header == columns]
    assert len(found) == 1, f"expected one table headed {columns}, found {len(found)}"
    return [{c: cell.strip("`").strip() for c, cell in zip(columns, row)} for row in found[0]]


def unique(keys: list[object]) -> None:
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, f"listed twice: {dupes}"


def module_constants() -> dict[str, int]:
    """Every public module-level integer constant of protocol.py."""
    return {
        name: value
        for name, value in vars(P).items()
        if name.isupper() and not name.startswith("_") and type(value) is int
    }


def module_structs() -> dict[str, str]:
    return {
        name: value.format
        for name, value in vars(P).items()
        if name.isupper() and isinstance(value, struct.Struct)
    }


# --- the parser itself ---------------------------------------------------------------
def test_parser_reads_a_table():
    text = "x\n\n| a | b |\n| --- | --- |\n| `1` | two |\n| 3 | 4 |\n\ny\n"
    assert table(["a", "b"], text) == [{"a": "1", "b": "two"}, {"a": "3", "b": "4"}]
    with pytest.raises(AssertionError):
        table(["a", "c"], text)


# --- constants ------------------------------------------------------------------------
def doc_constants() -> dict[str, str]:
    rows = table(["name", "value", "meaning"])
    unique([r["name"] for r in rows])
    for r in rows:
        assert r["meaning"], f"{r['name']} has no meaning"
    return {r["name"]: r["value"] for r in rows}


def test_constants_are_written_as_python_int_literals():
    for name, text in doc_constants().items():
        assert INT_LITERAL.match(text), f"{name}: {text!r} is not a plain int or hex literal"


def test_every_documented_constant_equals_the_module():
    for name, text in doc_constants().items():
        assert hasattr(P, name), f"{name} is documented but not in multifd_cli.wire"
        assert ast.literal_eval(text) == getattr(P, name), (
            f"{name}: doc says {text}, module has {getattr(P, name)!r}"
        )


def test_required_constants_are_documented():
    missing = set(REQUIRED_CONSTANTS) - set(doc_constants())
    assert not missing, f"not in the Constants table: {sorted(missing)}"


def test_every_module_constant_is_documented():
    missing = set(module_constants()) - set(doc_constants())
    assert not missing, f"protocol.py constants missing from docs/protocol.md: {sorted(missing)}"


# --- message types ----------------------------------------------------------------------
def test_message_types_match_both_ways():
    rows = table(["name", "id", "direction", "payload"])
    unique([r["name"] for r in rows])
    unique([r["id"] for r in rows])
    for r in rows:
        assert INT_LITERAL.match(r["id"]), r
        assert r["direction"] and r["payload"], r
    doc = {r["name"]: int(r["id"]) for r in rows}
    assert doc == {t.name: t.value for t in P.MsgType}


# --- structs ------------------------------------------------------------------------------
def test_struct_formats_match_both_ways():
    rows = table(["struct", "format", "fields"])
    unique([r["struct"] for r in rows])
    doc = {r["struct"]: r["format"] for r in rows}
    structs = module_structs()
    for name, fmt in doc.items():
        assert name in structs, f"{name} is documented but is not a struct in protocol.py"
        assert fmt == structs[name], f"{name}: doc says {fmt!r}, module has {structs[name]!r}"
    assert set(doc) == set(structs)
    for r in rows:
        assert r["fields"], r


def test_header_layout_matches_the_header_struct():
    rows = table(["offset", "size", "field"])
    codes = re.findall(r"\d*[a-zA-Z?]", P.HEADER.format.lstrip("<"))
    assert len(rows) == len(codes)
    pos = 0
    for row, code in zip(rows, codes):
        size = struct.calcsize("<" + code)
        assert (int(row["offset"]), int(row["size"])) == (pos, size), row
        assert row["field"], row
        pos += size
    assert pos == P.HEADER_SIZE == P.HEADER.size
    assert rows[-1]["offset"] == str(P.HEADER_CRC_SPAN)


# --- states ---------------------------------------------------------------------------------
def _state(name: str) -> P.State:
    assert name in P.State.__members__, f"{name} is not a wire.State"
    return P.State[name]


def _states_section() -> str:
    return DOC.read_text().split("## States", 1)[1].split("\n## ", 1)[0]


def test_transitions_match_both_ways():
    """The doc's table is ORDER, row for row; HEARTBEAT and ABORT are the prose's."""
    rows = table(["role", "state", "direction", "event", "next state"])
    keys = [(r["role"], _state(r["state"]), r["direction"], r["event"]) for r in rows]
    unique(keys)
    doc = {k: _state(r["next state"]) for k, r in zip(keys, rows)}
    extra = set(doc) - set(P.ORDER)
    missing = set(P.ORDER) - set(doc)
    assert not extra, f"documented but not in ORDER: {extra}"
    assert not missing, f"in ORDER but not documented: {missing}"
    wrong = {k: (doc[k], P.ORDER[k]) for k in doc if doc[k] != P.ORDER[k]}
    assert not wrong, f"doc vs module next state: {wrong}"
    assert list(doc) == list(P.ORDER), "the doc lists the rows in another order than ORDER"


def test_the_table_is_order_plus_the_always_legal_events():
    always = {k: n for k, n in P.TRANSITIONS.items() if k[3] in P.ALWAYS}
    assert {k: n for k, n in P.TRANSITIONS.items() if k[3] not in P.ALWAYS} == P.ORDER
    for (_, state, _, event), nxt in always.items():
        assert nxt == (state if event == "HEARTBEAT" else P.State.ABORTED)


def test_start_states_match_both_ways():
    rows = table(["role", "start state"])
    unique([r["role"] for r in rows])
    assert {r["role"]: _state(r["start state"]) for r in rows} == P.START


def test_always_legal_events_are_documented():
    states = _states_section()
    for event in P.ALWAYS:
        assert f"`{event}`" in states


def test_heartbeat_states_are_the_documented_ones():
    """The prose names the states where HEARTBEAT is legal; they are HEARTBEAT_STATES."""
    text = " ".join(_states_section().split())
    listed = text.split("`HEARTBEAT` leaves the state unchanged", 1)[1].split(".", 1)[0]
    named = {s for s in P.State.__members__ if re.search(rf"\b{s}\b", listed)}
    assert {P.State[s] for s in named} == P.HEARTBEAT_STATES


def test_message_directions_match_the_order_table():
    """The message-type table's "send → recv" / "recv → send" is what ORDER says each
    side does with that message: send-* roles say what send says, recv-* hear it."""
    rows = table(["name", "id", "direction", "payload"])
    for r in rows:
        speaker = r["direction"].split(",")[0].strip()
        if speaker.startswith("either way"):
            continue
        who = {"send → recv": "send", "recv → send": "recv"}[speaker]
        events = ["SYNC", "PACKET"] if r["name"] == "PACKET" else [r["name"]]
        found = [(k, d) for (k, _, d, e) in P.ORDER if e in events]
        assert found, f"{r['name']} appears in no row of ORDER"
        for role, direction in found:
            said = role.startswith(who + "-")
            assert direction == (P.SEND if said else P.RECV), (r["name"], role, direction)


def test_directions_are_the_modules():
    rows = table(["role", "state", "direction", "event", "next state"])
    assert {r["direction"] for r in rows} == {P.SEND, P.RECV}


def test_doc_mentions_every_enum_member():
    text = DOC.read_text()
    for enum in (P.MsgType, P.State):
        assert issubclass(enum, Enum)
        for member in enum:
            assert member.name in text, f"{enum.__name__}.{member.name} is not in the doc"
