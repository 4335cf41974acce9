"""Label selectors in Calico's syntax: which endpoints a policy applies to, or allows.

    app == "api"                       k8s-app in {"a", "b"}          has(team)
    app != "api" && !has(canary)       tier not in {"db"}             all()
    (app == "fe" || app == "web") && cluster == "east"
    name starts with "web-"            name ends with "-1"            name contains "x"

Operators bind as in Calico: `!` tightest, then `&&`, then `||`; parentheses group. Values are
quoted with `"` or `'`. A label that is absent matches no comparison but `!=` and `not in`
(Calico's semantics: `app != "x"` selects endpoints without `app`). Label keys are Kubernetes-
style names (`[prefix/]name`: letters, digits, `-`, `_`, `.`, at most 253 characters).

`parse(text)` returns a `Selector` (frozen, hashable; `str()` gives its canonical text, so two
spellings of one selector compare equal); `SelectorError` names the position and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import ClusterMeshError

MAX_SELECTOR_LEN = 4096
MAX_DEPTH = 32  # parentheses and `!` nested this deep at most (a hostile record cannot recurse away)
LABEL_KEY = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
MAX_VALUE_LEN = 256


class SelectorError(ClusterMeshError):
    """A selector that does not parse: `pos` is the character offset, `reason` says why."""

    def __init__(self, text: str, pos: int, reason: str) -> None:
        self.text, self.pos, self.reason = text, pos, reason
        super().__init__(f"at character {pos + 1}: {reason}")


Labels = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector: `matches(labels)`; `str()` is its canonical text."""

    node: Node

    def matches(self, labels: Labels) -> bool:
        return self.node.matches(labels)

    def __str__(self) -> str:
        return self.node.text(0)


# --- the tree ---------------------------------------------------------------------------------
# Each node renders itself at a precedence level (0: ||, 1: &&, 2: unary/atom), adding
# parentheses only where the level needs them: the canonical text.


@dataclass(frozen=True, slots=True)
class All:
    def matches(self, labels: Labels) -> bool:
        return True

    def text(self, level: int) -> str:
        return "all()"


@dataclass(frozen=True, slots=True)
class Has:
    key: str

    def matches(self, labels: Labels) -> bool:
        return self.key in labels

    def text(self, level: int) -> str:
        return f"has({self.key})"


_COMPARE: dict[str, Callable[[str, str], bool]] = {
    "==": lambda have, want: have == want,
    "contains": lambda have, want: want in have,
    "starts with": lambda have, want: have.startswith(want),
    "ends with": lambda have, want: have.endswith(want),
}


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    op: str  # "==", "!=", "contains", "starts with", "ends with"
    value: str

    def matches(self, labels: Labels) -> bool:
        have = labels.get(self.key)
        if self.op == "!=":
            return have != self.value
        return have is not None and _COMPARE[self.op](have, self.value)

    def text(self, level: int) -> str:
        return f"{self.key} {self.op} {_quote(self.value)}"


@dataclass(frozen=True, slots=True)
class In:
    key: str
    values: frozenset[str]
    negated: bool = False

    def matches(self, labels: Labels) -> bool:
        have = labels.get(self.key)
        inside = have is not None and have in self.values
        return not inside if self.negated else inside

    def text(self, level: int) -> str:
        vals = ", ".join(_quote(v) for v in sorted(self.values))
        return f"{self.key} {'not in' if self.negated else 'in'} {{{vals}}}"


@dataclass(frozen=True, slots=True)
class Not:
    inner: Node

    def matches(self, labels: Labels) -> bool:
        return not self.inner.matches(labels)

    def text(self, level: int) -> str:
        return "!" + self.inner.text(2)


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Node, ...]

    def matches(self, labels: Labels) -> bool:
        return all(p.matches(labels) for p in self.parts)

    def text(self, level: int) -> str:
        s = " && ".join(p.text(1) for p in self.parts)
        return f"({s})" if level > 1 else s


@dataclass(frozen=True, slots=True)
class Or:
    parts: tuple[Node, ...]

    def matches(self, labels: Labels) -> bool:
        return any(p.matches(labels) for p in self.parts)

    def text(self, level: int) -> str:
        s = " || ".join(p.text(0) for p in self.parts)
        return f"({s})" if level > 0 else s


Node = All | Has | Compare | In | Not | And | Or


def _quote(value: str) -> str:
    return f"'{value}'" if '"' in value else f'"{value}"'


# --- the parser -------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>"[^"]*"|'[^']*')
    | (?P<op>==|!=|&&|\|\||!|\(|\)|\{|\}|,)
    | (?P<word>[A-Za-z0-9][A-Za-z0-9._/-]*)
    )""", re.VERBOSE)


@dataclass(slots=True)
class _Tok:
    kind: str  # "str", "op", "word", "end"
    value: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            ch = text[i]
            if ch in "\"'":
                raise SelectorError(text, i, "a quoted value is not closed")
            raise SelectorError(text, i, f"unexpected character {ch!r}")
        kind = m.lastgroup or "op"
        value = m.group(kind)
        out.append(_Tok(kind, value, m.start(kind)))
        i = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return t

    def fail(self, tok: _Tok, reason: str) -> SelectorError:
        return SelectorError(self.text, tok.pos, reason)

    def expect_op(self, op: str, what: str) -> None:
        t = self.take()
        if t.kind != "op" or t.value != op:
            raise self.fail(t, f"expected {what}, found {_say(t)}")

    def parse(self) -> Node:
        node = self.or_()
        t = self.peek()
        if t.kind != "end":
            raise self.fail(t, f"expected && or || or the end, found {_say(t)}")
        return node

    def or_(self) -> Node:
        parts = [self.and_()]
        while self.peek().kind == "op" and self.peek().value == "||":
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_(self) -> Node:
        parts = [self.unary()]
        while self.peek().kind == "op" and self.peek().value == "&&":
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def unary(self) -> Node:
        t = self.peek()
        if t.kind == "op" and t.value in ("!", "("):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(t, f"nested more than {MAX_DEPTH} deep")
            self.take()
            if t.value == "!":
                node: Node = Not(self.unary())
            else:
                node = self.or_()
                self.expect_op(")", "')'")
            self.depth -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        t = self.take()
        if t.kind != "word":
            raise self.fail(t, f"expected a label, has(...) or all(), found {_say(t)}")
        nxt = self.peek()
        if t.value in ("has", "all") and nxt.kind == "op" and nxt.value == "(":
            self.take()
            if t.value == "all":
                self.expect_op(")", "')' (all() takes nothing)")
                return All()
            k = self.take()
            if k.kind != "word":
                raise self.fail(k, f"expected a label name in has(...), found {_say(k)}")
            self.expect_op(")", "')'")
            return Has(self.key(k))
        key = self.key(t)
        op = self.take()
        if op.kind == "op" and op.value in ("==", "!="):
            return Compare(key, op.value, self.value())
        if op.kind == "word":
            if op.value == "in":
                return In(key, self.values())
            if op.value == "not" and self.peek().kind == "word" and self.peek().value == "in":
                self.take()
                return In(key, self.values(), negated=True)
            if op.value == "contains":
                return Compare(key, "contains", self.value())
            if op.value in ("starts", "ends") and self.peek().kind == "word" and self.peek().value == "with":
                self.take()
                return Compare(key, f"{op.value} with", self.value())
        raise self.fail(op, f"expected an operator after {key!r} (==, !=, in, not in, contains, "
                            f"starts with, ends with), found {_say(op)}")

    def key(self, t: _Tok) -> str:
        if not LABEL_KEY.fullmatch(t.value):
            raise self.fail(t, f"{t.value!r} is not a label name ([prefix/]name: letters, digits, '-', '_', '.')")
        return t.value

    def value(self) -> str:
        t = self.take()
        if t.kind != "str":
            raise self.fail(t, f"expected a quoted value, found {_say(t)}")
        v = t.value[1:-1]
        if len(v) > MAX_VALUE_LEN:
            raise self.fail(t, f"a value longer than {MAX_VALUE_LEN} characters")
        return v

    def values(self) -> frozenset[str]:
        self.expect_op("{", "'{' opening the set of values")
        out: list[str] = []
        if self.peek().kind == "op" and self.peek().value == "}":
            self.take()
            return frozenset()
        while True:
            out.append(self.value())
            t = self.take()
            if t.kind == "op" and t.value == "}":
                return frozenset(out)
            if t.kind != "op" or t.value != ",":
                raise self.fail(t, f"expected ',' or '}}' in the set of values, found {_say(t)}")


def _say(t: _Tok) -> str:
    return "the end" if t.kind == "end" else repr(t.value)


def parse(text: str) -> Selector:
    """Parse a selector (see the module's docstring); an empty one selects every endpoint."""
    if not isinstance(text, str):
        raise SelectorError(str(text), 0, "a selector is a string")
    if len(text) > MAX_SELECTOR_LEN:
        raise SelectorError(text, MAX_SELECTOR_LEN, f"longer than {MAX_SELECTOR_LEN} characters")
    if not text.strip():
        return Selector(All())
    return Selector(_Parser(text).parse())


_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
MAX_LABELS = 64
BUILTIN_LABELS = ("cluster", "node")  # set by the agent for every endpoint; never given by a pod


def check_labels(labels: object, where: str = "labels", *, builtin_ok: bool = False) -> dict[str, str]:
    """A pod's labels, validated (Kubernetes' rules: `[prefix/]name` keys, values of at most 63
    letters, digits, '-', '_' and '.'); ValueError names the label and the reason."""
    if not isinstance(labels, dict):
        raise ValueError(f"{where}: must be a mapping of label names to values")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{where}: {len(labels)} labels; at most {MAX_LABELS}")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY.fullmatch(k):
            raise ValueError(f"{where}: {str(k)[:64]!r} is not a label name ([prefix/]name: letters, digits, "
                             "'-', '_', '.')")
        if k in BUILTIN_LABELS and not builtin_ok:
            raise ValueError(f"{where}.{k}: set by wiremesh itself (the endpoint's {k})")
        if not isinstance(v, str) or not _LABEL_VALUE.fullmatch(v):
            raise ValueError(f"{where}.{k}: {str(v)[:64]!r} is not a label value (at most 63 letters, digits, "
                             "'-', '_', '.')")
        out[k] = v
    return out
