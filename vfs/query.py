"""The smart-folder query language: parse a query, compile it to an SQLite WHERE expression.

A query is terms combined with AND, OR, NOT and parentheses (juxtaposition is AND; NOT binds
tighter than AND, AND tighter than OR; keywords are case-insensitive)::

    ext:pdf size>10M (mtime<7d OR tag:invoice) NOT under:/archive

Terms (field names are case-insensitive):

- ``name:GLOB``       SQLite GLOB on the entry name (``*``, ``?``, ``[...]``), case-sensitive.
- ``ext:pdf``         the name is ``X.pdf`` with X not empty; ASCII case-insensitive; ``ext:.pdf``
                      is the same.
- ``size OP N``       OP is ``<``, ``>``, ``<=``, ``>=`` or ``=``; N like ``512``, ``10M``,
                      ``1.5GiB`` (K M G T are powers of 1024, rounded to the nearest byte).
                      Directories count as size 0 whatever their stored size; symbolic links
                      have the length of their target.
- ``mtime OP T``      also ``atime``, ``ctime``. A duration (``30s 15m 12h 7d 2w 1y``) is an age:
                      ``mtime<7d`` is "modified less than 7 days ago". A local date or time
                      (``2026-01-01``, ``2026-01-01T09:30[:15]``) is an instant: ``mtime>D`` is
                      "modified after D"; ``mtime=D`` is "within that day" (or minute, second).
- ``type:K``          K in file dir symlink fifo socket char block (aliases f d l).
- ``owner:U``         user name or uid; ``group:G`` group name or gid (names resolved when the
                      query is compiled; an unknown name is an error).
- ``under:/dir``      anywhere below that directory (not the directory itself); a path that does
                      not exist matches nothing.
- ``xattr:NAME=VAL``  that extended attribute with exactly that value; ``xattr:NAME`` presence.
- ``tag:T``           ``user.tags`` holds a comma-separated list with an element equal to T
                      (ASCII case-insensitive, spaces around elements ignored).
- ``state:S``         S in ghost hydrated pinned (the ``ghosts`` row's state) or local (no row).

A value is a bare word (up to whitespace, ``(`` or ``)``) or a double-quoted string with ``\\"``
and ``\\\\`` escapes; adjacent bare and quoted pieces join into one value
(``xattr:user.title="moon landing"``). Quoting only groups: glob characters keep their meaning.
"""

from __future__ import annotations

import grp
import logging
import pwd
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

log = logging.getLogger(__name__)

TAGS_XATTR = b"user.tags"
COMPARE_OPS = ("<", ">", "<=", ">=", "=")
TYPES = {
    "file": stat.S_IFREG, "f": stat.S_IFREG,
    "dir": stat.S_IFDIR, "d": stat.S_IFDIR,
    "symlink": stat.S_IFLNK, "l": stat.S_IFLNK,
    "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK,
    "char": stat.S_IFCHR, "block": stat.S_IFBLK,
}
STATES = ("ghost", "hydrated", "pinned", "local")
TIME_FIELDS = ("mtime", "atime", "ctime")
MATCH_FIELDS = ("name", "ext", "type", "owner", "group", "under", "xattr", "tag", "state")
FIELDS = MATCH_FIELDS + ("size",) + TIME_FIELDS
SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
DURATION_NS = {u: sec * 10**9 for u, sec in
               {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}.items()}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)(?:([kmgt])(i?b)?|(b))?", re.IGNORECASE)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdwy])", re.IGNORECASE)
_DATE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2}))?)?")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FMT_DIR = stat.S_IFDIR


class QueryError(ValueError):
    """A query that cannot be parsed or compiled, with the 0-based offset of the problem."""

    def __init__(self, message: str, position: int, query: str) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.query = query

    def __str__(self) -> str:
        return (f"query error at column {self.position + 1}: {self.message}\n"
                f"{self.query}\n{' ' * self.position}^")


# --- the parsed tree ------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One `field op value` condition; `value` is already checked and converted."""

    field: str
    op: str
    value: object
    pos: int
    value_pos: int


@dataclass(frozen=True)
class Not:
    """The negation of a sub-query."""

    child: Node


@dataclass(frozen=True)
class And:
    """All sub-queries hold."""

    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    """At least one sub-query holds."""

    children: tuple[Node, ...]


Node = Term | Not | And | Or


@dataclass(frozen=True)
class Age:
    """A duration in nanoseconds, measured back from the time the query is compiled."""

    ns: int


@dataclass(frozen=True)
class Instant:
    """A local date or time: the span [start_ns, end_ns) it names (a day, minute or second)."""

    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class Query:
    """A parsed query: its text and its tree."""

    text: str
    root: Node


# --- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    kind: str  # "(" ")" "AND" "OR" "NOT" "TERM" "END"
    pos: int
    term: Term | None = None


class _Lexer:
    """Splits a query into parentheses, keywords and checked terms."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def error(self, message: str, pos: int) -> QueryError:
        return QueryError(message, pos, self.text)

    def tokens(self) -> Iterator[_Tok]:
        """The tokens in order, read lazily so that the first problem in the text is reported."""
        text = self.text
        while True:
            while self.i < len(text) and text[self.i].isspace():
                self.i += 1
            if self.i >= len(text):
                yield _Tok("END", len(text))
                return
            c = text[self.i]
            if c in "()":
                self.i += 1
                yield _Tok(c, self.i - 1)
                continue
            m = _FIELD_RE.match(text, self.i)
            if m is None:
                hint = " (use NOT to negate)" if c == "-" else ", expected a term like name:GLOB"
                raise self.error(f"unexpected {c!r}{hint}", self.i)
            word, start = m.group(), self.i
            self.i = m.end()
            nxt = text[self.i] if self.i < len(text) else ""
            if nxt and nxt in ":<>=":
                yield _Tok("TERM", start, self.term(word, start))
            elif word.upper() in ("AND", "OR", "NOT"):
                yield _Tok(word.upper(), start)
            elif word.lower() in FIELDS:
                raise self.error(f"expected an operator after {word!r}", self.i)
            else:
                raise self.error(f"expected a term like name:GLOB, found {word!r}", start)

    def term(self, word: str, start: int) -> Term:
        field = word.lower()
        if field not in FIELDS:
            raise self.error(f"unknown field {word!r} (fields: {', '.join(FIELDS)})", start)
        op_pos = self.i
        op = self.text[self.i:self.i + 2]
        if op not in ("<=", ">="):
            op = self.text[self.i]
        self.i += len(op)
        if field in MATCH_FIELDS and op != ":":
            raise self.error(f"{field!r} takes ':' ({field}:VALUE), not {op!r}", op_pos)
        if field not in MATCH_FIELDS and op == ":":
            raise self.error(f"{field!r} takes a comparison (<, >, <=, >=, =), not ':'", op_pos)
        value_pos = self.i
        raw = self.value()
        if raw == "":
            raise self.error(f"missing value after '{word}{op}'", value_pos)
        value = _check(field, op, raw, lambda msg: self.error(msg, value_pos))
        return Term(field, op, value, start, value_pos)

    def value(self) -> str:
        """A bare word and quoted strings, joined, up to whitespace or a parenthesis."""
        text, parts = self.text, []
        while self.i < len(text) and not text[self.i].isspace() and text[self.i] not in "()":
            if text[self.i] != '"':
                parts.append(text[self.i])
                self.i += 1
                continue
            quote = self.i
            self.i += 1
            while True:
                if self.i >= len(text):
                    raise self.error("unterminated quoted string", quote)
                c = text[self.i]
                if c == '"':
                    self.i += 1
                    break
                if c == "\\":
                    esc = text[self.i + 1:self.i + 2]
                    if esc not in ('"', "\\"):
                        raise self.error("only \\\" and \\\\ can be escaped in a quoted string",
                                         self.i)
                    c = esc
                    self.i += 1
                parts.append(c)
                self.i += 1
        return "".join(parts)


# --- values ---------------------------------------------------------------------------------


def _check(field: str, op: str, raw: str, fail: Callable[[str], QueryError]) -> object:
    """The checked, converted value of one term (an error from `fail` when it is wrong)."""
    if field == "size":
        return _size(raw, fail)
    if field in TIME_FIELDS:
        value = _time(raw, fail)
        if op == "=" and isinstance(value, Age):
            raise fail(f"'{field}=' needs a date (like {field}=2026-01-01), not a duration; "
                       f"use {field}<{raw} or {field}>{raw}")
        return value
    if field == "name":
        return raw
    if field == "ext":
        ext = raw[1:] if raw.startswith(".") else raw
        if not ext:
            raise fail("missing extension after the dot")
        return ext
    if field == "type":
        if raw.lower() not in TYPES:
            raise fail(f"unknown type {raw!r} (types: file dir symlink fifo socket char block, "
                       "or f d l)")
        return TYPES[raw.lower()]
    if field in ("owner", "group"):
        return int(raw) if raw.isdigit() else raw
    if field == "under":
        if not raw.startswith("/"):
            raise fail(f"'under:' needs a path from the filesystem root (starting '/'): {raw!r}")
        return "/" + "/".join(p for p in raw.split("/") if p)
    if field == "xattr":
        name, eq, val = raw.partition("=")
        if not name:
            raise fail("missing attribute name in 'xattr:NAME=VALUE'")
        return (name.encode(), val.encode() if eq else None)
    if field == "tag":
        tag = raw.strip(" ")
        if "," in tag:
            raise fail("a tag cannot contain ','")
        if not tag:
            raise fail("empty tag")
        return _ascii_lower(tag)
    if raw.lower() not in STATES:
        raise fail(f"unknown state {raw!r} (states: {' '.join(STATES)})")
    return raw.lower()


def _size(raw: str, fail: Callable[[str], QueryError]) -> int:
    m = _SIZE_RE.fullmatch(raw)
    if m is None:
        raise fail(f"bad size {raw!r}: expected a number with an optional unit K M G T "
                   "(like 512, 10M, 1.5GiB)")
    power = SIZE_UNITS[(m.group(2) or "").lower()]
    scaled = Decimal(m.group(1)) * (1024 ** power)
    return int(scaled.to_integral_value(rounding=ROUND_HALF_UP))


def _time(raw: str, fail: Callable[[str], QueryError]) -> Age | Instant:
    m = _DURATION_RE.fullmatch(raw)
    if m is not None:
        ns = Decimal(m.group(1)) * DURATION_NS[m.group(2).lower()]
        return Age(int(ns.to_integral_value(rounding=ROUND_HALF_UP)))
    m = _DATE_RE.fullmatch(raw)
    if m is None:
        raise fail(f"bad time {raw!r}: expected an age like 7d (s m h d w y) or a local date "
                   "like 2026-01-01 or 2026-01-01T09:30")
    y, mo, d, hh, mm, ss = m.groups()
    try:
        day = date(int(y), int(mo), int(d))
        if hh is None:
            start = datetime(day.year, day.month, day.day)
            end = datetime.combine(day + timedelta(days=1), datetime.min.time())
        else:
            start = datetime(day.year, day.month, day.day, int(hh), int(mm), int(ss or 0))
            end = start + timedelta(seconds=1 if ss is not None else 60)
        return Instant(_local_ns(start), _local_ns(end))
    except (ValueError, OverflowError, OSError) as exc:
        raise fail(f"bad date {raw!r}: {exc}") from exc


def _local_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch of a naive local time (as `find -newermt`)."""
    return int(moment.timestamp()) * 10**9


def _ascii_lower(s: str) -> str:
    """Lower-case ASCII letters only, as SQLite's lower() does."""
    return s.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


# --- parser ---------------------------------------------------------------------------------


class _Parser:
    """Recursive descent: or := and (OR and)*; and := not ([AND] not)*; not := NOT not | atom."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _Lexer(text).tokens()
        self.next: _Tok | None = None

    def peek(self) -> _Tok:
        if self.next is None:
            self.next = next(self.toks)
        return self.next

    def take(self) -> _Tok:
        tok = self.peek()
        if tok.kind != "END":
            self.next = None
        return tok

    def error(self, message: str, pos: int) -> QueryError:
        return QueryError(message, pos, self.text)

    def parse(self) -> Node:
        if self.peek().kind == "END":
            raise self.error("empty query", 0)
        node = self.or_expr(None)
        tok = self.peek()
        if tok.kind != "END":  # only ")" can stop the top level early
            raise self.error("unexpected ')' with no matching '('", tok.pos)
        return node

    def or_expr(self, after: str | None) -> Node:
        children = [self.and_expr(after)]
        while self.peek().kind == "OR":
            self.take()
            children.append(self.and_expr("OR"))
        return children[0] if len(children) == 1 else Or(tuple(children))

    def and_expr(self, after: str | None) -> Node:
        children = [self.not_expr(after)]
        while True:
            kind = self.peek().kind
            if kind == "AND":
                self.take()
                children.append(self.not_expr("AND"))
            elif kind in ("TERM", "NOT", "("):
                children.append(self.not_expr(None))
            else:
                return children[0] if len(children) == 1 else And(tuple(children))

    def not_expr(self, after: str | None) -> Node:
        if self.peek().kind == "NOT":
            self.take()
            return Not(self.not_expr("NOT"))
        return self.atom(after)

    def atom(self, after: str | None) -> Node:
        tok = self.take()
        if tok.kind == "TERM":
            assert tok.term is not None
            return tok.term
        if tok.kind == "(":
            node = self.or_expr("(")
            close = self.take()
            if close.kind != ")":
                raise self.error(f"expected ')' to close '(' at column {tok.pos + 1}", close.pos)
            return node
        where = f" after '{after}'" if after else ""
        if tok.kind == "END":
            raise self.error(f"expected a term{where}", tok.pos)
        if tok.kind == ")":
            raise self.error(f"expected a term{where}, found ')'", tok.pos)
        raise self.error(f"expected a term{where}, found '{tok.kind}' (it joins two terms)",
                         tok.pos)


def parse(text: str) -> Query:
    """Parse a smart-folder query; raises QueryError pointing at the first problem."""
    return Query(text, _Parser(text).parse())


# --- compiler -------------------------------------------------------------------------------


_SQL_OP = {"<": "<", ">": ">", "<=": "<=", ">=": ">=", "=": "="}
_AGE_OP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}  # younger than = later than
_GLOB_META = "*?["


def compile_where(query: Query, resolve_dir: Callable[[str], int | None],
                  now_ns: int) -> tuple[str, list]:
    """An SQL boolean expression over `dentries d JOIN inodes i ON i.id = d.inode`, and its
    parameters. `resolve_dir` gives the inode of a directory path (None if there is none);
    ages count back from `now_ns`."""
    params: list = []

    def fail(term: Term, message: str) -> QueryError:
        return QueryError(message, term.value_pos, query.text)

    def walk(node: Node) -> str:
        if isinstance(node, Not):
            return f"NOT {walk(node.child)}"
        if isinstance(node, And | Or):
            joiner = " AND " if isinstance(node, And) else " OR "
            return "(" + joiner.join(walk(c) for c in node.children) + ")"
        return "(" + term_sql(node) + ")"

    def term_sql(t: Term) -> str:
        f, v = t.field, t.value
        if f == "name":
            assert isinstance(v, str)
            return _name_sql(v, params)
        if f == "ext":
            escaped = re.sub(r"([\\%_])", r"\\\1", _ascii_lower(str(v)))
            params.append("_%." + escaped)
            # LIKE ignores the case of ASCII letters itself (no lower(): it costs per row)
            return "CAST(d.name AS TEXT) LIKE ? ESCAPE '\\'"
        if f == "size":
            assert isinstance(v, int)
            params.append(v)
            dirs_match = {"<": 0 < v, ">": False, "<=": True, ">=": v <= 0, "=": v == 0}[t.op]
            if dirs_match:
                return f"i.size {_SQL_OP[t.op]} ? OR (i.mode & 61440) = {_FMT_DIR}"
            return f"i.size {_SQL_OP[t.op]} ? AND (i.mode & 61440) <> {_FMT_DIR}"
        if f in TIME_FIELDS:
            col = f"i.{f}_ns"
            if isinstance(v, Age):
                params.append(now_ns - v.ns)
                return f"{col} {_AGE_OP[t.op]} ?"
            assert isinstance(v, Instant)
            if t.op == "=":
                params.extend((v.start_ns, v.end_ns))
                return f"{col} >= ? AND {col} < ?"
            params.append(v.start_ns)
            return f"{col} {_SQL_OP[t.op]} ?"
        if f == "type":
            params.append(v)
            return "(i.mode & 61440) = ?"
        if f in ("owner", "group"):
            params.append(_owner_id(t, fail))
            return f"i.{'uid' if f == 'owner' else 'gid'} = ?"
        if f == "under":
            assert isinstance(v, str)
            top = resolve_dir(v)
            if top is None:
                log.debug("query %r: no directory %s", query.text, v)
                return "0"
            params.append(top)
            return ("d.parent IN (WITH RECURSIVE below(id) AS (VALUES (?) UNION "
                    "SELECT c.inode FROM below JOIN dentries c ON c.parent = below.id "
                    f"JOIN inodes ci ON ci.id = c.inode WHERE (ci.mode & 61440) = {_FMT_DIR}) "
                    "SELECT id FROM below)")
        if f == "xattr":
            assert isinstance(v, tuple)
            name, val = v
            if val is None:
                params.append(name)
                return "i.id IN (SELECT x.inode FROM xattrs x WHERE x.name = ?)"
            params.extend((name, val))
            return "i.id IN (SELECT x.inode FROM xattrs x WHERE x.name = ? AND x.value = ?)"
        if f == "tag":
            params.extend((TAGS_XATTR, v))
            # The list as a JSON array: json_quote escapes '"' and '\', so splitting its
            # string at every ',' stays valid JSON (other bytes pass through unchanged); the
            # CASE keeps one malformed value from failing the whole query.
            arr = "'[' || replace(json_quote(CAST(x.value AS TEXT)), ',', '\",\"') || ']'"
            return ("i.id IN (SELECT x.inode FROM xattrs x, "
                    f"json_each(CASE WHEN json_valid({arr}) THEN {arr} ELSE '[]' END) j "
                    "WHERE x.name = ? AND lower(trim(j.value, ' ')) = ?)")
        assert f == "state"
        if v == "local":
            return "i.id NOT IN (SELECT g.inode FROM ghosts g)"
        params.append(v)
        return "i.id IN (SELECT g.inode FROM ghosts g WHERE g.state = ?)"

    sql = walk(query.root)
    return sql, params


def _name_sql(pattern: str, params: list) -> str:
    """A GLOB on the (BLOB) name, with the literal prefix as an index range on dentries_name."""
    cut = min((pattern.find(c) for c in _GLOB_META if c in pattern), default=-1)
    if cut < 0:
        params.append(pattern.encode())
        return "d.name = ?"
    prefix = pattern[:cut].encode()
    upper = _after_prefix(prefix)
    clauses = []
    if prefix:
        clauses.append("d.name >= ?")
        params.append(prefix)
    if upper is not None:
        clauses.append("d.name < ?")
        params.append(upper)
    clauses.append("CAST(d.name AS TEXT) GLOB ?")
    params.append(pattern)
    return " AND ".join(clauses)


def _after_prefix(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _owner_id(term: Term, fail: Callable[[Term, str], QueryError]) -> int:
    if isinstance(term.value, int):
        return term.value
    name = str(term.value)
    try:
        if term.field == "owner":
            return pwd.getpwnam(name).pw_uid
        return grp.getgrnam(name).gr_gid
    except KeyError as exc:
        kind = "user" if term.field == "owner" else "group"
        raise fail(term, f"unknown {kind} {name!r}") from exc
