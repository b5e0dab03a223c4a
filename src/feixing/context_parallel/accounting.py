"""Communication accounting: bytes each rank sends per collective, and the order collectives were issued.

Bytes are what *this rank puts on the wire* under the usual algorithms: all-to-all sends all
but its own slice ((n-1)/n of the input), point-to-point sends the tensor, ring all-gather
sends its input n-1 times, ring all-reduce sends 2 (n-1)/n of the buffer. The `log` keeps one
entry per collective call (kind, phase, label) so tests can check that every rank issued the
same sequence, e.g. in backward. It keeps the last LOG_MAX entries only: a trainer's CP object
records every collective of every step, so an unbounded log grew for the whole run.
"""

from __future__ import annotations

from collections import defaultdict, deque

LOG_MAX = 10_000  # far more than one attention forward + backward issues


class CommCounter:
    """Per-collective byte totals and a call log. `phase` is 'fwd' or 'bwd'."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)  # (kind, phase) -> bytes
        self.log: deque[tuple[str, str, str]] = deque(maxlen=LOG_MAX)  # (kind, phase, label) in issue order

    def record(self, kind: str, phase: str, nbytes: int, label: str = "") -> None:
        self.bytes[(kind, phase)] += int(nbytes)
        self.log.append((kind, phase, label))

    def total(self, phase: str | None = None, kind: str | None = None) -> int:
        return sum(b for (k, ph), b in self.bytes.items()
                   if (phase is None or ph == phase) and (kind is None or k == kind))

    def summary(self) -> dict[str, int]:
        """{'all_to_all/fwd': bytes, ...} for reports and JSON."""
        return {f"{k}/{ph}": b for (k, ph), b in sorted(self.bytes.items())}
