"""When a tree session's TREE operations are applied, relative to the epochs' pages.

The source sends the ops that change the tree's shape for epoch k before
EPOCH_START k, and the TIMES of epoch k (after the final epoch, DIRMETA too) after
EPOCH_END k (docs/protocol.md, "Directory trees"). They travel on the main
connection while the channels may still be writing pages of epoch k - 1 or k, so
recv's main applies them only where the epoch barrier makes that safe:

- shape ops of epoch k: once every channel applied all of epoch k - 1 (closed) and
  before any channel is released into k. Before EPOCH_START k no channel can be in
  k, so they are applied at once when k - 1 is already closed, and held otherwise;
- XATTRS/TIMES/DIRMETA of epoch k: once epoch k is closed, because writing a page
  moves a file's mtime (and drops its security.capability); at once if it is, else
  held until it closes. Their phase order restarts with each epoch.

Any other epoch number is a protocol error.

Memory: what is held waits as its wire encoding (HeldOps), not as TreeOps. A pass over
a million new files holds a million TIMES until its epoch closes; as TreeOps with
their paths that is ~200 bytes a file, encoded about 70 plus the path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from multifd_cli import wire as P
from multifd_cli.errors import ProtocolError
from multifd_cli.recv.tree import TreeApplier
from multifd_cli.wire.treecodec import parse_tree, tree_payload
from multifd_cli.wire.treeops import RANK, Op, TreeOp

LATE_OPS = (Op.XATTRS, Op.TIMES, Op.DIRMETA)


class HeldOps:
    """One epoch's held TREE operations, as the TREE payloads they came in (each
    within MAX_TREE_OPS, so each encodes back into one payload)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def extend(self, ops: Sequence[TreeOp]) -> None:
        self.payloads.append(tree_payload(0, ops))

    def batches(self) -> Iterator[tuple[TreeOp, ...]]:
        """The operations again, one message's worth at a time, in arrival order."""
        for payload in self.payloads:
            yield parse_tree(payload).ops


class TreeOrder:
    """Holds TREE operations until the barrier lets them land, then applies them."""

    def __init__(self, applier: TreeApplier) -> None:
        self.applier = applier
        self.held: dict[int, HeldOps] = {}  # shape ops of epoch k, until k - 1 closes
        self.late: dict[int, HeldOps] = {}  # TIMES/DIRMETA of epoch k, until k closes
        self.shape_epoch = 0  # the epoch whose shape ops were applied last
        self.late_epoch = 0  # the epoch whose late ops were applied last
        self.finished = False  # DIRMETA applied: only MANIFEST and DIGEST may follow
        self.manifest: P.Manifest | None = None

    def on_tree(self, msg: P.Tree, started: int, closed: int) -> None:
        """A TREE message; `started` and `closed` are the barrier's epochs now."""
        k = msg.epoch
        if self.finished:
            raise ProtocolError(f"TREE for epoch {k} after the final DIRMETA")
        if k == started + 1:
            _only(msg.ops, lambda op: RANK[op] <= RANK[Op.META],
                  f"for epoch {k} before its EPOCH_START", "an op that changes the shape")
            if closed >= started:
                self._shape(k, msg.ops)
            else:
                self.held.setdefault(k, HeldOps()).extend(msg.ops)
        elif k == started and k >= 1:
            _only(msg.ops, lambda op: op in LATE_OPS, f"for epoch {k} after its EPOCH_END",
                  "XATTRS, TIMES or DIRMETA")
            if closed >= k:
                self._late(k, msg.ops)
            else:
                self.late.setdefault(k, HeldOps()).extend(msg.ops)
        else:
            raise ProtocolError(
                f"TREE epoch: got {k}, expected {started + 1} (before its EPOCH_START)"
                + (f" or {started} (after its EPOCH_END)" if started else "")
            )

    def on_epoch_start(self, epoch: int) -> None:
        if self.finished:
            raise ProtocolError(f"EPOCH_START {epoch} after the final DIRMETA")

    def on_closed(self, epoch: int) -> None:
        """Every channel applied all of `epoch`: its times, then the next one's shape."""
        held = self.late.pop(epoch, None)
        for ops in held.batches() if held is not None else ():
            self._late(epoch, ops)
        self.on_release(epoch + 1)

    def on_release(self, epoch: int) -> None:
        """A channel is about to go into `epoch`: its shape must be in place first
        (already done at the close of the one before, unless the barrier is off)."""
        held = self.held.pop(epoch, None)
        for ops in held.batches() if held is not None else ():
            self._shape(epoch, ops)

    def _shape(self, epoch: int, ops: Sequence[TreeOp]) -> None:
        if self.shape_epoch != epoch:
            self.applier.begin_epoch()
            self.shape_epoch = epoch
        self.applier.apply(ops)

    def _late(self, epoch: int, ops: Sequence[TreeOp]) -> None:
        if self.late_epoch != epoch:  # XATTRS may follow the last epoch's TIMES
            self.applier.begin_epoch()
            self.late_epoch = epoch
        self.applier.apply(ops)
        if any(op.op == Op.DIRMETA for op in ops):
            self.finished = True


def _only(ops: Sequence[TreeOp], ok: Callable[[Op], bool], where: str, expected: str) -> None:
    for op in ops:
        if not isinstance(op.op, Op) or not ok(op.op):
            name = op.op.name if isinstance(op.op, Op) else repr(op.op)
            raise ProtocolError(f"TREE {name} {where}: expected {expected}")
