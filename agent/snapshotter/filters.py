"""containerd's filter syntax for List, as containerd and its GC send it.

A filter is selectors joined by ``,`` (all must match); a List request carries several
filters, any of which may match. A selector is a field path, optionally followed by an
operator (``==``, ``!=``, ``~=`` for a regular expression) and a value. Path
components and values may be quoted with ``"`` (or ``/`` and ``|``, handy around a
regular expression); unquoted values run up to the next ``,`` or space. Example, the
query containerd makes after a remote snapshot's ALREADY_EXISTS::

    labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/3/sha256:def"

The fields of a snapshot are ``name``, ``parent``, ``kind`` (``active``, ``view``,
``committed``) and ``labels.<key>``; a path alone tests for presence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.snapshotter.errors import InvalidArgumentError
from agent.snapshotter.metastore import Info, Kind

_QUOTES = '"/|'
_OPERATORS = ("==", "!=", "~=")
_FIELD_RUNE = re.compile(r"[-_A-Za-z0-9]")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_NUMERIC_ESCAPES = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}
_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


@dataclass(frozen=True)
class Selector:
    """One ``path [operator value]`` test."""

    path: tuple[str, ...]
    operator: str | None
    value: str

    def matches(self, info: Info) -> bool:
        """Apply the test the way containerd's filters do (``!=`` holds for an absent field)."""
        value = field_value(info, self.path)
        if self.operator is None:
            return value is not None
        if self.operator == "==":
            return value == self.value
        if self.operator == "!=":
            return value != self.value
        return re.search(self.value, value or "") is not None


@dataclass(frozen=True)
class Filter:
    """Any of several conjunctions of selectors."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, info: Info) -> bool:
        """True when some alternative has all its selectors matching (no filter: all)."""
        if not self.alternatives:
            return True
        return any(all(s.matches(info) for s in selectors) for selectors in self.alternatives)


def field_value(info: Info, path: tuple[str, ...]) -> str | None:
    """The value of a snapshot field, None when the field is absent or unknown."""
    head, rest = path[0], path[1:]
    if head == "labels":
        return info.labels.get(".".join(rest)) if rest else None
    if rest:
        return None
    if head == "name":
        return info.name
    if head == "parent":
        return info.parent
    if head == "kind":
        return _KIND_NAMES.get(info.kind)
    return None


def parse_filters(filters: Sequence[str]) -> Filter:
    """Parse a List request's filters; an empty string matches everything."""
    alternatives = []
    for text in filters:
        if not text.strip():
            return Filter(())
        alternatives.append(_Parser(text).selectors())
    return Filter(tuple(alternatives))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def selectors(self) -> tuple[Selector, ...]:
        selectors = [self._selector()]
        while self._skip_spaces() < len(self.text):
            self._expect(",")
            selectors.append(self._selector())
        return tuple(selectors)

    def _selector(self) -> Selector:
        path = [self._component()]
        while self._peek() == ".":
            self.pos += 1
            path.append(self._component())
        self._skip_spaces()
        operator = next((op for op in _OPERATORS if self.text.startswith(op, self.pos)), None)
        if operator is None:
            return Selector(tuple(path), None, "")
        self.pos += len(operator)
        value = self._value()
        if operator == "~=":
            try:
                re.compile(value)
            except re.error as exc:
                raise self._error(f"bad regular expression {value!r}: {exc}") from None
        return Selector(tuple(path), operator, value)

    def _component(self) -> str:
        self._skip_spaces()
        if self._peek() in _QUOTES:
            return self._quoted()
        start = self.pos
        while self.pos < len(self.text) and _FIELD_RUNE.match(self.text[self.pos]):
            self.pos += 1
        if start == self.pos:
            raise self._error("expected a field name")
        return self.text[start : self.pos]

    def _value(self) -> str:
        self._skip_spaces()
        if self._peek() in _QUOTES:
            return self._quoted()
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos] != ","
            and (not self.text[self.pos].isspace())
        ):
            self.pos += 1
        if start == self.pos:
            raise self._error("expected a value")
        return self.text[start : self.pos]

    def _quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self._error("quoted literal not terminated")
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            out.append(self._escape(quote) if char == "\\" else char)

    def _escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self._error("quoted literal not terminated")
        char = self.text[self.pos]
        self.pos += 1
        if char in (quote, "\\"):
            return char
        if char in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[char]
        base, digits = _NUMERIC_ESCAPES.get(char, (8, 3) if char in "01234567" else (0, 0))
        if not base:
            raise self._error(f"illegal escape sequence \\{char}")
        start = self.pos - 1 if base == 8 else self.pos
        number = self.text[start : start + digits]
        self.pos = start + digits
        try:
            return chr(int(number, base))
        except ValueError:
            raise self._error(f"illegal numeric escape sequence {number!r}") from None

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip_spaces(self) -> int:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.pos

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise self._error(f"expected {char!r}")
        self.pos += 1

    def _error(self, message: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"filter {self.text!r} at {self.pos}: {message}")
