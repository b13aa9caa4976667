"""Fuzz the sans-IO decoder for a number of seconds.

    python tests/fuzz/fuzz_decoder.py SECONDS [--no-atheris]

The invariant under test (multifd_cli/wire/codec.py): any bytes, whole or split
at any points, yield messages or a ProtocolError; nothing else escapes. The
same goes for check_packet on whatever packets come out and for
Conversation.receive fed those messages.

With atheris importable (an optional extra, `pip install atheris`; not a
project dependency) this runs libFuzzer with coverage feedback, seeded with the
golden vectors of tests/golden/. Without it, or with --no-atheris, it runs a
built-in random mutation loop over the golden vectors. Either way it ends with
"executions: N, crashes: K" and exits non-zero if anything crashed.

The first byte of every input steers the run, so that mutations explore it too:
bit 0x80 applies small decoder Limits, bit 0x40 repairs the header CRCs (to get
past the CRC check into the body parsers), and the low six bits are the chunk
size the input is fed in (0 = whole).
"""

from __future__ import annotations

import os
import random
import struct
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "golden"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    if "--no-atheris" in sys.argv:
        raise ImportError("disabled")
    import atheris
except ImportError:
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from multifd_cli import errors as E
        from multifd_cli import wire as P
else:
    from multifd_cli import errors as E
    from multifd_cli import wire as P

KINDS = sorted(P.START)
SMALL = P.Limits(max_pages=64, max_payload=4096, max_control=4096)
SIZES = ([], [0], [1300, 4096], [1 << 40, 512])
_HDR = struct.Struct("<IBBBBHHIQIIII")
executions = 0


def fix_crcs(buf: bytearray) -> None:
    """Rewrite the CRC of every header found by walking the message chain."""
    pos = 0
    while pos + P.HEADER_SIZE <= len(buf):
        fields = _HDR.unpack_from(buf, pos)
        mtype, normal, zero, plen = fields[1], fields[9], fields[10], fields[11]
        crc = zlib.crc32(bytes(buf[pos : pos + P.HEADER_CRC_SPAN]))
        struct.pack_into("<I", buf, pos + P.HEADER_CRC_SPAN, crc)
        body = 16 * normal + 8 * zero + plen if mtype == P.MsgType.PACKET else plen
        pos += P.HEADER_SIZE + body


def one_input(data: bytes) -> None:
    """Decode one input; any exception other than ProtocolError is a crash."""
    global executions
    executions += 1
    if not data:
        return
    ctl, body = data[0], bytearray(data[1:])
    if ctl & 0x40:
        fix_crcs(body)
    decoder = P.Decoder(SMALL if ctl & 0x80 else None)
    conversation = P.Conversation(KINDS[len(body) % len(KINDS)])
    step = (ctl & 0x3F) or max(len(body), 1)
    messages = []
    try:
        for i in range(0, len(body), step):
            decoder.feed(bytes(body[i : i + step]))
            for msg in decoder.messages():
                messages.append(msg)
                try:
                    conversation.receive(msg)
                except E.ProtocolError:
                    pass
    except E.ProtocolError as e:
        if not str(e):
            raise AssertionError("ProtocolError without a message") from e
        decoder.feed(b"\x00")  # the decoder must stay usable after an error
    for msg in messages:
        if isinstance(msg, P.Packet):
            for sizes in SIZES:
                try:
                    P.check_packet(msg, sizes, 512, 64)
                except E.ProtocolError:
                    pass
        elif isinstance(msg, P.Config):
            try:
                P.check_config(msg)
            except E.ProtocolError:
                pass


def seeds() -> list[bytes]:
    vectors = [p.read_bytes() for p in sorted(GOLDEN_DIR.glob("*.bin"))]
    if not vectors:
        raise SystemExit(f"no golden vectors in {GOLDEN_DIR}")
    out = []
    for v in vectors:
        out += [b"\x00" + v, b"\x41" + v, b"\x87" + v]
    out.append(b"\x40" + b"".join(vectors))
    out.append(b"\x13" + b"".join(vectors))
    return out


# --- built-in mutation loop (no atheris) ---------------------------------------------
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # bit flip
            b[i % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # interesting byte
            b[i % len(b)] = rng.choice(INTERESTING)
        elif op == 2:  # insert random bytes
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:  # delete a range
            del b[i : i + rng.randint(1, 16)]
        elif op == 4:  # truncate
            del b[i:]
        elif op == 5:  # duplicate a range
            b[i:i] = b[i : i + rng.randint(1, 64)]
        elif op == 6:  # splice another input in
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            b[i:] = other[j:]
        elif op == 7 and len(b) >= 5:  # overwrite a u32 with an edge value
            j = rng.randrange(len(b) - 3)
            v = rng.choice([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32)])
            b[j : j + 4] = v.to_bytes(4, "little")
        elif op == 8 and b:  # change the control byte
            b[0] = rng.randrange(256)
    return bytes(b)


def fallback(seconds: float) -> int:
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))
    pool = seeds()
    crashes = 0
    out_dir: Path | None = None
    deadline = time.monotonic() + seconds
    for s in pool:
        one_input(s)
    while True:
        for _ in range(256):
            data = mutate(rng, rng.choice(pool), pool)
            try:
                one_input(data)
            except Exception:
                crashes += 1
                if crashes <= 10:  # keep the first few; one is usually enough
                    if out_dir is None:
                        out_dir = Path(tempfile.mkdtemp(prefix="multifd-fuzz-crashes-"))
                    path = out_dir / f"crash-{crashes}.bin"
                    path.write_bytes(data)
                    if crashes <= 3:
                        traceback.print_exc()
                        print(f"crashing input saved to {path}", file=sys.stderr)
            if rng.random() < 0.01 and len(pool) < 4096:
                pool.append(data)
        if time.monotonic() >= deadline:
            break
    print(f"executions: {executions}, crashes: {crashes}")
    return 1 if crashes else 0


# --- atheris / libFuzzer --------------------------------------------------------------
def with_atheris(seconds: int) -> int:
    # A corpus that persists between runs, so each run goes on from the last.
    work = Path(tempfile.gettempdir()) / "multifd-fuzz"
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for n, s in enumerate(seeds()):
        (corpus / f"seed-{n}").write_bytes(s)
    args = [
        sys.argv[0], str(corpus), f"-artifact_prefix={work}/", "-max_len=8192",
        f"-max_total_time={seconds + 30}",  # a backstop: target() ends the run on time
    ]
    started = time.monotonic()

    def target(data: bytes) -> None:
        try:
            one_input(data)
        except Exception:
            print(f"executions: {executions}, crashes: 1 (inputs saved under {work})", flush=True)
            raise  # libFuzzer prints the traceback, saves the input and exits non-zero
        if time.monotonic() - started >= seconds:
            print(f"executions: {executions}, crashes: 0 (atheris, corpus {corpus})", flush=True)
            sys.stderr.flush()
            os._exit(0)  # libFuzzer would exit without running Python's atexit anyway

    atheris.Setup(args, target)
    atheris.Fuzz()  # does not return
    return 0


def main(argv: list[str]) -> int:
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) != 1 or not positional[0].isdigit():
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    seconds = int(positional[0])
    if atheris is not None:
        return with_atheris(seconds)
    print("atheris not in use: running the built-in mutation loop", file=sys.stderr)
    return fallback(seconds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
