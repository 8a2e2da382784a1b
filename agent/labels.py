"""Kubernetes label selectors (`app=leaf,tier!=cache,env in (a,b),!canary`), parsed once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# A label key: an optional DNS-subdomain prefix and a name of up to 63 characters.
_KEY = r"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_CMP = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|!=|=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(?P<not>!?)\s*(?P<key>{_KEY})\s*$")


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


@dataclass(frozen=True)
class Selector:
    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def _split(text: str) -> list[str]:
    """Commas outside parentheses separate requirements."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_selector(text: str) -> Selector:
    """The equality- and set-based syntax of `kubectl get -l`; empty matches everything."""
    reqs: list[Requirement] = []
    if not text.strip():
        return Selector(text, ())
    for part in _split(text):
        if m := _SET.match(part):
            values = frozenset(v.strip() for v in m["values"].split(","))
            if not all(re.fullmatch(_VALUE, v) for v in values):
                raise SelectorError(f"invalid values in label selector part {part.strip()!r}")
            reqs.append(Requirement(m["key"], m["op"], values))
        elif m := _CMP.match(part):
            op = "notin" if m["op"] == "!=" else "in"
            reqs.append(Requirement(m["key"], op, frozenset([m["value"]])))
        elif m := _EXISTS.match(part):
            reqs.append(Requirement(m["key"], "!exists" if m["not"] else "exists"))
        else:
            raise SelectorError(
                f"invalid label selector {text!r} at {part.strip()!r}: "
                "use e.g. app=leaf, tier!=cache, env in (a,b), !canary"
            )
    return Selector(text, tuple(reqs))
