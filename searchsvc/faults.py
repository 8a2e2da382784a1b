"""Fault injection for the "new deployment" mode.

Every process takes the same flags (``--fault-rate``, ``--faults``,
``--deadline-ms``, ``--fault-seed``); with ``--fault-rate 0`` (the default, the
"old deployment") nothing is injected and nothing behaves differently.

The faults are ``stale-index`` (a leaf answers from its stale ``.idx.next``
twins), ``deadline`` (a leaf answers after the root's deadline),
``cpu-starved`` (a leaf's CPU is taken by a SCHED_FIFO neighbour process, see
:mod:`searchsvc.hog`), ``lock-held`` (a leaf blocks on a file lock that a
neighbour process holds, see :mod:`searchsvc.locker`), ``net-delay`` (the
network between root and leaf, a delaying TCP proxy process, holds a leaf's
prompt answer past the root's deadline, see :mod:`searchsvc.netdelay`) and
``disk-io`` (a neighbour process drops a leaf's index from the page cache and
floods the same disk with O_DIRECT reads while the leaf reads it back, see
:mod:`searchsvc.diskio`).  All but the first two are off unless listed in
``--faults``: the default is :data:`DEFAULT_FAULTS`, the first two.

Faults are decided per query by each leaf with one draw from its own seeded
generator: with ``r`` uniform in [0, 1), the k-th configured fault (from 0)
happens when ``k * rate <= r < (k + 1) * rate``; listed in the canonical order
of :data:`FAULTS`, that is [0, r) stale-index, [r, 2r) deadline, [2r, 3r)
cpu-starved, [3r, 4r) lock-held, [4r, 5r) net-delay, [5r, 6r) disk-io,
counting only the enabled ones.  Each fault
therefore has probability ``rate`` per query and leaf (for
``rate * len(faults) <= 1``), at most one fault hits a given leaf answer, and
since every query costs exactly one draw, the number of faults a leaf injects
over N queries depends only on the seed, not on how concurrent queries
interleave.  That holds for ``net-delay`` too: the leaf, not its proxy,
draws it with the same single draw and then tells its proxy to hold that one
answer (see :mod:`searchsvc.leaf`), so it never coincides with another fault.
"""

from __future__ import annotations

import argparse
import random
import threading
from dataclasses import dataclass
from typing import Literal, get_args

Fault = Literal["stale-index", "deadline", "cpu-starved", "lock-held", "net-delay", "disk-io"]
FAULTS: tuple[Fault, ...] = get_args(Fault)
# What a FaultConfig, the CLI and a Cluster enable unless told otherwise.
DEFAULT_FAULTS: tuple[Fault, ...] = ("stale-index", "deadline")


@dataclass(frozen=True)
class FaultConfig:
    rate: float = 0.0
    faults: tuple[str, ...] = DEFAULT_FAULTS
    deadline_ms: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate {self.rate} not in [0, 1]")
        if self.deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be positive, got {self.deadline_ms}")
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {list(FAULTS)}")

    def enabled(self, fault: Fault) -> bool:
        return self.rate > 0.0 and fault in self.faults

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0

    def argv(self) -> list[str]:
        """The command-line flags that reproduce this config."""
        return [
            "--fault-rate",
            repr(self.rate),
            "--faults",
            ",".join(self.faults),
            "--deadline-ms",
            str(self.deadline_ms),
            "--fault-seed",
            str(self.seed),
        ]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FaultConfig:
        return cls(
            rate=args.fault_rate,
            faults=args.faults,
            deadline_ms=args.deadline_ms,
            seed=args.fault_seed,
        )


def _parse_faults(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown faults {unknown}; known: {list(FAULTS)}")
    return names


def add_fault_args(parser: argparse.ArgumentParser) -> None:
    d = FaultConfig()
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=d.rate,
        help="per-query probability of each fault (0: old deployment, no faults)",
    )
    parser.add_argument(
        "--faults",
        type=_parse_faults,
        default=d.faults,
        help=f"comma-separated faults to inject, of {','.join(FAULTS)} "
        f"(default: {','.join(d.faults)})",
    )
    parser.add_argument(
        "--deadline-ms",
        type=int,
        default=d.deadline_ms,
        help="root's per-leaf deadline when the deadline or net-delay fault is enabled",
    )
    parser.add_argument("--fault-seed", type=int, default=d.seed, help="seed of fault decisions")


class FaultDice:
    """One leaf's per-query fault decisions, reproducible from ``seed + leaf_id``."""

    def __init__(self, config: FaultConfig, leaf_id: int) -> None:
        self.config = config
        self._rng = random.Random(config.seed + leaf_id)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        rate = self.config.rate
        if rate <= 0.0:
            return None  # old mode: not even a draw
        with self._lock:
            r = self._rng.random()
        for k, fault in enumerate(self.config.faults, start=1):
            if r < k * rate:
                return fault
        return None
