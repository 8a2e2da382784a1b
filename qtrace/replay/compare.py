"""Structural comparison of responses, and noise learned the way Diffy does.

Paths look like ``$.hits[3].score``; the same path with indices generalised
(``$.hits[*].score``) is what noise is learned and ignore patterns are matched on."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_INDEX = re.compile(r"\[\d+\]")


def generic(path: str) -> str:
    return _INDEX.sub("[*]", path)


def _norm_pattern(p: str) -> str:
    """A user's path pattern as an fnmatch pattern: ``*`` is a wildcard, brackets are
    literal (so ``hits[*].score`` matches every index)."""
    p = p if p.startswith("$") else "$." + p
    return p.replace("[", "[[]")


@dataclass(frozen=True)
class CompareOptions:
    ignore: tuple[str, ...] = ()  # path patterns (fnmatch on the generic path)
    sets: tuple[str, ...] = ()  # lists at these paths are compared as multisets
    tolerance: float = 0.0  # numbers equal within this relative (or, near 0, absolute) gap

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(_norm_pattern(p) for p in self.ignore))
        object.__setattr__(self, "sets", tuple(_norm_pattern(p) for p in self.sets))

    def ignored(self, path: str) -> bool:
        g = generic(path)
        return any(fnmatch.fnmatchcase(g, p) or fnmatch.fnmatchcase(path, p) for p in self.ignore)

    def as_set(self, path: str) -> bool:
        g = generic(path)
        return any(fnmatch.fnmatchcase(g, p) or fnmatch.fnmatchcase(path, p) for p in self.sets)


@dataclass(frozen=True)
class Difference:
    path: str
    left: Any
    right: Any


def _close(a: float, b: float, tol: float) -> bool:
    if a == b:
        return True
    return tol > 0 and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def diff(a: Any, b: Any, opts: CompareOptions, path: str = "$") -> list[Difference]:
    if opts.ignored(path):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[Difference] = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{k}"
            if k not in a or k not in b:
                if not opts.ignored(sub):
                    out.append(Difference(sub, a.get(k), b.get(k)))
            else:
                out += diff(a[k], b[k], opts, sub)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if opts.as_set(path):
            ca, cb = Counter(map(_canon, a)), Counter(map(_canon, b))
            if ca == cb:
                return []
            return [Difference(path, sorted((ca - cb).elements()), sorted((cb - ca).elements()))]
        out = []
        for i in range(max(len(a), len(b))):
            sub = f"{path}[{i}]"
            if i >= len(a) or i >= len(b):
                if not opts.ignored(sub):
                    out.append(
                        Difference(sub, a[i] if i < len(a) else None, b[i] if i < len(b) else None)
                    )
            else:
                out += diff(a[i], b[i], opts, sub)
        return out
    if isinstance(a, bool) or isinstance(b, bool):  # JSON true is not 1
        return [] if type(a) is type(b) and a == b else [Difference(path, a, b)]
    if isinstance(a, int | float) and isinstance(b, int | float):
        return [] if _close(float(a), float(b), opts.tolerance) else [Difference(path, a, b)]
    return [] if a == b else [Difference(path, a, b)]


@dataclass
class Response:
    status: int | None = None  # None: no response (see error)
    body: bytes = b""
    latency_ns: int = 0
    error: str | None = None

    def parsed(self) -> tuple[bool, Any]:
        try:
            return True, json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False, None


def compare(left: Response, right: Response, opts: CompareOptions) -> list[Difference]:
    """Differences between two answers to the same request (status first, then body)."""
    out = []
    if left.status != right.status and not opts.ignored("$status"):
        out.append(Difference("$status", left.status, right.status))
    lj, lv = left.parsed()
    rj, rv = right.parsed()
    if lj and rj:
        return out + diff(lv, rv, opts)
    if left.body != right.body and not opts.ignored("$body"):
        out.append(Difference("$body", digest(left.body), digest(right.body)))
    return out


def digest(body: bytes) -> str:
    return f"sha256:{hashlib.sha256(body).hexdigest()[:16]} ({len(body)} bytes)"


@dataclass
class Noise:
    """Paths where primary and secondary (the same old code twice) disagree."""

    paths: Counter[str] = field(default_factory=Counter)

    def learn(self, diffs: list[Difference]) -> None:
        for d in diffs:
            self.paths[generic(d.path)] += 1

    def filter(self, diffs: list[Difference]) -> list[Difference]:
        return [d for d in diffs if generic(d.path) not in self.paths]
