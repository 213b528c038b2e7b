"""The smart-folder query language: every term and operator, combinations and random queries
checked against a Python model over a generated metadata database, index use, and errors."""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.attrs import ROOT_INODE
from vfs.fs import Filesystem
from vfs.metadb import MetaDB
from vfs.query import QueryError, compile_where, parse

S = 10**9
DAY = 86400 * S
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MY_UID, MY_GID = os.getuid(), os.getgid()


def local_ns(*fields: int) -> int:
    """A local time in ns since the epoch, through mktime (not the code under test's path)."""
    y, mo, d, hh, mm, ss = (*fields, 0, 0, 0)[:6]
    return int(time.mktime((y, mo, d, hh, mm, ss, 0, 0, -1))) * S


NOW = local_ns(2026, 3, 15, 12)
JAN1 = local_ns(2026, 1, 1)
JAN2 = local_ns(2026, 1, 2)
NOON = local_ns(2026, 1, 1, 12, 30, 15)


@dataclass
class Row:
    """One directory entry and its inode, as the model sees them."""

    dentry: int
    parent: int
    name: str
    ino: int
    mode: int
    size: int
    uid: int
    gid: int
    atime: int
    mtime: int
    ctime: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    ghost: str | None = None
    ancestors: frozenset[int] = frozenset()


STEMS = ["report", "Report", "héllo wörld", "my file 1", "invoice", "data", "ñandú", "日本語",
         "a", "x y", "star*", "q?"]
EXTS = ["", ".pdf", ".PDF", ".Pdf", ".txt", ".pdf.txt", ".tar.gz", ".a_b", ".aXb", ".jpg", ".7"]
SPECIAL = [".pdf", "pdf", "..pdf", "PDF", "data", ".hidden"]
DIRNAMES = ["docs", "Archive", "photos 2025", "ñ", "deep", "x"]
SIZES = [0, 1, 512, 1023, 1024, 1025, 10 * MiB - 1, 10 * MiB, 10 * MiB + 1, 1536 * MiB,
         3 * GiB, 10 * GiB, 11 * GiB]
TAGS = [b"invoice, Tax", b" INVOICE ,x", b"invoices", b"a,,b", b"in voice", b'b"c,d\\e',
        b"tax", b"\xff,invoice", b"  Invoice  ", b"x,  in voice ,y"]
PROJECTS = [b"apollo", b"Apollo", b"apollo 11", b"gemini"]


def gen_time(rng: random.Random) -> int:
    return rng.choice([
        NOW, NOW - S, NOW - 7 * DAY, NOW - 7 * DAY + 1, NOW - 7 * DAY - 1, NOW + 3600 * S,
        JAN1, JAN1 - 1, JAN2, JAN2 - 1, NOON, NOON + S, NOON - 1,
        NOW - rng.randrange(0, 800 * DAY), NOW - rng.randrange(0, 10 * DAY)])


def build_db(path: str) -> tuple[MetaDB, list[Row], dict[str, int]]:
    """A formatted metadata database with a generated tree written straight into its tables."""
    rng = random.Random(20260315)
    db = MetaDB(path, create=True)
    Filesystem.format(db, 0, 0)
    rows: list[Row] = []
    dirs: dict[int, tuple[str, frozenset[int]]] = {ROOT_INODE: ("", frozenset([ROOT_INODE]))}
    paths: dict[str, int] = {"/": ROOT_INODE}
    used: set[tuple[int, str]] = set()
    next_ino = [ROOT_INODE + 1]

    def add(parent: int, name: str, mode: int, size: int, ino: int | None = None) -> Row:
        while (parent, name) in used:
            name = "~" + name
        used.add((parent, name))
        fresh = ino is None
        if fresh:
            ino = next_ino[0]
            next_ino[0] += 1
        assert ino is not None
        r = Row(0, parent, name, ino, mode, size, rng.choice([0, 1000, 1001, MY_UID]),
                rng.choice([0, 100, 1000, MY_GID]), gen_time(rng), gen_time(rng), gen_time(rng),
                ancestors=dirs[parent][1])
        if fresh:
            db.change("INSERT INTO inodes (id, mode, nlink, uid, gid, size, atime_ns, mtime_ns, "
                      "ctime_ns) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)",
                      (ino, mode, r.uid, r.gid, size, r.atime, r.mtime, r.ctime))
        db.change("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                  (parent, name.encode(), ino))
        r.dentry = db.last_id()
        rows.append(r)
        return r

    for k in range(30):
        parent = ROOT_INODE if k == 0 else rng.choice(list(dirs))
        size = 4096 if k == 3 else 0  # a directory counts as size 0 whatever is stored
        r = add(parent, "docs" if k == 0 else rng.choice(DIRNAMES), stat.S_IFDIR | 0o755, size)
        path = dirs[parent][0] + "/" + r.name
        dirs[r.ino] = (path, dirs[parent][1] | {r.ino})
        paths[path] = r.ino
    files = []
    for k in range(200):
        name = SPECIAL[k] if k < len(SPECIAL) else rng.choice(STEMS) + rng.choice(EXTS)
        files.append(add(rng.choice(list(dirs)), name, stat.S_IFREG | 0o644, rng.choice(SIZES)))
    for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        add(rng.choice(list(dirs)), "node.pdf", kind | 0o600, 0)
    for _ in range(6):
        target = rng.choice(["../a", "/x/y/z", "report.pdf"])
        add(rng.choice(list(dirs)), rng.choice(STEMS) + ".lnk", stat.S_IFLNK | 0o777, len(target))
    for f in rng.sample(files, 8):  # hard links: one inode, two entries
        link = add(rng.choice(list(dirs)), "link " + f.name, f.mode, f.size, ino=f.ino)
        link.uid, link.gid, link.atime, link.mtime, link.ctime = (f.uid, f.gid, f.atime,
                                                                  f.mtime, f.ctime)
    by_ino: dict[int, list[Row]] = {}
    for r in rows:
        by_ino.setdefault(r.ino, []).append(r)
    for ino, entries in by_ino.items():
        xattrs: dict[bytes, bytes] = {}
        if rng.random() < 0.35:
            xattrs[b"user.project"] = rng.choice(PROJECTS)
        if rng.random() < 0.45:
            xattrs[b"user.tags"] = rng.choice(TAGS)
        if rng.random() < 0.15:
            xattrs[b"user.flag"] = rng.choice([b"", b"1"])
        ghost = rng.choice(["ghost", "hydrated", "pinned"]) if rng.random() < 0.3 else None
        for name, value in xattrs.items():
            db.change("INSERT INTO xattrs VALUES (?, ?, ?)", (ino, name, value))
        if ghost:
            db.change("INSERT INTO ghosts (inode, source, size, mtime_ns, state) "
                      "VALUES (?, ?, 0, 0, ?)", (ino, b"/src", ghost))
        for r in entries:
            r.xattrs, r.ghost = xattrs, ghost
    db.commit()
    return db, rows, paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    db, rows, paths = build_db(str(tmp_path_factory.mktemp("query") / "meta.db"))
    yield db, rows, paths
    db.close()


def run(world, text: str, now: int = NOW) -> set[int]:
    db, _rows, paths = world
    sql, params = compile_where(parse(text), paths.get, now)
    return {r[0] for r in db.rows(
        f"SELECT d.id FROM dentries d JOIN inodes i ON i.id = d.inode WHERE {sql}", params)}


# --- the model ------------------------------------------------------------------------------


def ascii_lower(s: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in s)


def cmp(op: str, a: int, b: int) -> bool:
    return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b, "=": a == b}[op]


def has_ext(ext: str) -> Callable[[Row], bool]:
    ext = ascii_lower(ext)
    return lambda r: (ascii_lower(r.name).endswith("." + ext)
                      and len(r.name) > len(ext) + 1)


def has_tag(tag: bytes) -> Callable[[Row], bool]:
    def match(r: Row) -> bool:
        value = r.xattrs.get(b"user.tags")
        return value is not None and any(
            e.strip(b" ").lower() == tag for e in value.split(b","))
    return match


def under(paths: dict[str, int], path: str) -> Callable[[Row], bool]:
    top = paths.get(path)
    return lambda r: top is not None and top in r.ancestors


def model_terms(paths: dict[str, int]) -> list[tuple[str, Callable[[Row], bool]]]:
    """Every term the tests use, with what it should select."""
    terms: list[tuple[str, Callable[[Row], bool]]] = []
    for pat, q in [("report*", "report*"), ("*.pdf", "*.pdf"), ('"my file*"', "my file*"),
                   ("h?llo*", "h?llo*"), ("[a-m]*", "[a-m]*"), ("*[0-9]", "*[0-9]"),
                   ("data", "data"), ("日本*", "日本*"), ("*", "*"), ('"x y.txt"', "x y.txt"),
                   ("*ñ*", "*ñ*"), ("?", "?"), ("invoice.pdf", "invoice.pdf"),
                   ("star[*]*", "star[*]*")]:
        terms.append((f"name:{pat}", lambda r, q=q: fnmatch.fnmatchcase(r.name, q)))
    for ext in ["pdf", ".PDF", "gz", "a_b", "7", "txt"]:
        terms.append((f"ext:{ext}", has_ext(ext.lstrip("."))))
    for op in ["<", ">", "<=", ">=", "="]:
        for text, n in [("0", 0), ("1K", KiB), ("1024", 1024), ("10M", 10 * MiB),
                        ("10MiB", 10 * MiB), ("1.5gb", 1536 * MiB), ("10G", 10 * GiB),
                        ("1025B", 1025), ("0.5k", 512)]:
            terms.append((f"size{op}{text}", lambda r, op=op, n=n: cmp(
                op, 0 if stat.S_ISDIR(r.mode) else r.size, n)))
    for f in ["mtime", "atime", "ctime"]:
        def col(r: Row, f: str = f) -> int:
            return getattr(r, f)
        for op in ["<", ">", "<=", ">="]:
            for text, ns in [("7d", 7 * DAY), ("1w", 7 * DAY), ("1h", 3600 * S),
                             ("90m", 5400 * S), ("1s", S), ("1.5d", 36 * 3600 * S),
                             ("1y", 365 * DAY)]:
                terms.append((f"{f}{op}{text}",
                               lambda r, col=col, op=op, ns=ns: cmp(op, NOW - col(r), ns)))
            for text, ns in [("2026-01-01", JAN1), ("2026-01-01T12:30:15", NOON),
                             ("2026-01-01T12:30", NOON - 15 * S)]:
                terms.append((f"{f}{op}{text}", lambda r, col=col, op=op, ns=ns: cmp(
                    op, col(r), ns)))
        for text, lo, hi in [("2026-01-01", JAN1, JAN2), ("2026-01-01T12:30", NOON - 15 * S,
                                                          NOON + 45 * S),
                             ("2026-01-01T12:30:15", NOON, NOON + S)]:
            terms.append((f"{f}={text}", lambda r, col=col, lo=lo, hi=hi: lo <= col(r) < hi))
    for text, kind in [("file", stat.S_IFREG), ("f", stat.S_IFREG), ("dir", stat.S_IFDIR),
                       ("d", stat.S_IFDIR), ("symlink", stat.S_IFLNK), ("l", stat.S_IFLNK),
                       ("fifo", stat.S_IFIFO), ("socket", stat.S_IFSOCK),
                       ("char", stat.S_IFCHR), ("block", stat.S_IFBLK), ("FILE", stat.S_IFREG)]:
        terms.append((f"type:{text}", lambda r, kind=kind: stat.S_IFMT(r.mode) == kind))
    for text, uid in [("0", 0), ("1000", 1000), (pwd.getpwuid(0).pw_name, 0),
                      (str(MY_UID), MY_UID)]:
        terms.append((f"owner:{text}", lambda r, uid=uid: r.uid == uid))
    for text, gid in [("100", 100), (grp.getgrgid(0).gr_name, 0)]:
        terms.append((f"group:{text}", lambda r, gid=gid: r.gid == gid))
    deepest = max(paths, key=lambda p: p.count("/"))
    for p in ["/", "/docs", "/docs/", "//docs", sorted(paths)[1], deepest, "/nonexistent",
              deepest + "/nothing"]:
        terms.append((f'under:"{p}"', under(paths, "/" + "/".join(filter(None, p.split("/"))))))
    for text, name, value in [
            ("user.project=apollo", b"user.project", b"apollo"),
            ('"user.project=apollo 11"', b"user.project", b"apollo 11"),
            ('user.project="apollo 11"', b"user.project", b"apollo 11"),
            ("user.project=Apollo", b"user.project", b"Apollo"),
            ("user.project", b"user.project", None), ("user.flag", b"user.flag", None),
            ("user.flag=", b"user.flag", b""), ("user.nothing", b"user.nothing", None)]:
        terms.append((f"xattr:{text}", lambda r, name=name, value=value: (
            name in r.xattrs if value is None else r.xattrs.get(name) == value)))
    for text, tag in [("invoice", b"invoice"), ("TAX", b"tax"), ('"in voice"', b"in voice"),
                      ('" invoice "', b"invoice"), ('"b\\"c"', b'b"c'), ('"d\\\\e"', b"d\\e"),
                      ("b", b"b"), ("x", b"x")]:
        terms.append((f"tag:{text}", has_tag(tag)))
    for s in ["ghost", "hydrated", "pinned"]:
        terms.append((f"state:{s}", lambda r, s=s: r.ghost == s))
    terms.append(("state:local", lambda r: r.ghost is None))
    return terms


@pytest.fixture(scope="module")
def terms(world):
    return model_terms(world[2])


def select(rows: list[Row], pred: Callable[[Row], bool]) -> set[int]:
    return {r.dentry for r in rows if pred(r)}


# --- single terms and combinations ----------------------------------------------------------


def test_every_term_matches_the_model(world, terms):
    rows = world[1]
    everything = {r.dentry for r in rows}
    trivial = []
    for text, pred in terms:
        expected = select(rows, pred)
        assert run(world, text) == expected, text
        if expected in (set(), everything):
            trivial.append(text)
    # The data exercises nearly every term: only the deliberate ones select all or nothing.
    assert set(trivial) <= {"name:*", "size>=0", "size<0", "size<=10G", "size>=0.5k", "owner:1000",
                            'under:"/"', 'under:"/nonexistent"', "xattr:user.nothing",
                            "name:?", "type:fifo", "type:socket", "type:char", "type:block",
                            *[t for t, _p in terms if t.startswith("under:") and "noth" in t]}, \
        trivial


def test_ext_edges(world):
    rows = world[1]
    names = {r.name for r in rows if r.dentry in run(world, "ext:pdf")}
    assert {"report.PDF", "invoice.Pdf", "..pdf", "node.pdf"} & names
    assert not {"pdf", ".pdf", "PDF"} & names
    assert not any(n.endswith(".pdf.txt") for n in names)
    assert run(world, "ext:pdf") == run(world, "ext:.PDF")


def test_name_is_case_sensitive_and_unicode(world):
    rows = world[1]
    got = {r.name for r in rows if r.dentry in run(world, "name:h?llo*")}
    assert got and all(n.startswith("héllo") for n in got)
    assert all(r.name.startswith("report") for r in rows if r.dentry in run(world, "name:rep*"))
    assert run(world, "name:rep*") != run(world, "name:Rep*")


def test_size_counts_directories_as_zero(world):
    rows = world[1]
    dirs = select(rows, lambda r: stat.S_ISDIR(r.mode))
    assert dirs <= run(world, "size=0") and dirs <= run(world, "size<1")
    assert not dirs & run(world, "size>=1")
    assert not dirs & run(world, "size>1K")  # even the one stored with size 4096


def test_tags(world):
    rows = world[1]
    values = {r.xattrs[b"user.tags"] for r in rows if r.dentry in run(world, "tag:invoice")}
    assert values == {b"invoice, Tax", b" INVOICE ,x", b"\xff,invoice", b"  Invoice  "}


@pytest.mark.parametrize("text,combine", [
    ("ext:pdf size>1M", lambda a, b, c, U: a & b),
    ("ext:pdf AND size>1M", lambda a, b, c, U: a & b),
    ("ext:pdf and size>1M or tag:invoice", lambda a, b, c, U: (a & b) | c),
    ("ext:pdf size>1M OR tag:invoice", lambda a, b, c, U: (a & b) | c),
    ("ext:pdf (size>1M OR tag:invoice)", lambda a, b, c, U: a & (b | c)),
    ("ext:pdf AND (size>1M OR tag:invoice)", lambda a, b, c, U: a & (b | c)),
    ("tag:invoice OR ext:pdf size>1M", lambda a, b, c, U: c | (a & b)),
    ("NOT ext:pdf size>1M", lambda a, b, c, U: (U - a) & b),
    ("NOT (ext:pdf size>1M)", lambda a, b, c, U: U - (a & b)),
    ("not ext:pdf OR NOT size>1M", lambda a, b, c, U: (U - a) | (U - b)),
    ("NOT NOT ext:pdf", lambda a, b, c, U: a),
    ("NOT(ext:pdf)OR(tag:invoice)", lambda a, b, c, U: (U - a) | c),
    ("((ext:pdf)) ((size>1M)) Or tag:invoice", lambda a, b, c, U: (a & b) | c),
    ("ext:pdf OR size>1M OR tag:invoice AND NOT ext:pdf", lambda a, b, c, U: a | b | (c - a)),
])
def test_combinations(world, text, combine):
    u = {r.dentry for r in world[1]}
    a, b, c = (run(world, t) for t in ("ext:pdf", "size>1M", "tag:invoice"))
    assert run(world, text) == combine(a, b, c, u)


def test_ages_count_from_now(world):
    rows = world[1]
    later = NOW + 30 * DAY
    assert run(world, "mtime<7d", now=later) == select(rows, lambda r: later - r.mtime < 7 * DAY)
    assert run(world, "mtime<7d", now=later) != run(world, "mtime<7d")


# --- random queries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    """A generated query: its text, its precedence (1 OR, 2 AND, 3 NOT, 4 atom), its model."""

    text: str
    prec: int
    eval: Callable[[set[int], list], set[int]]


def leaf(k: int) -> Q:
    return Q(f"#{k}", 4, lambda universe, sets: sets[k])


def wrap(q: Q, need: int) -> str:
    return q.text if q.prec >= need else f"({q.text})"


def combine(draw_kind: tuple[str, str, list[Q]]) -> Q:
    kind, word, kids = draw_kind
    if kind == "not":
        k = kids[0]
        return Q(f"{word} {wrap(k, 3)}", 3, lambda u, s: u - k.eval(u, s))
    if kind == "paren":
        k = kids[0]
        return Q(f"({k.text})", 4, k.eval)
    if kind == "and":
        sep = " " if word == "" else f" {word} "
        return Q(sep.join(wrap(k, 2) for k in kids), 2,
                 lambda u, s: set.intersection(*(k.eval(u, s) for k in kids)))
    return Q(f" {word} ".join(wrap(k, 1) for k in kids), 1,
             lambda u, s: set.union(*(k.eval(u, s) for k in kids)))


def queries(n_terms: int) -> st.SearchStrategy[Q]:
    def extend(children: st.SearchStrategy[Q]) -> st.SearchStrategy[Q]:
        return st.one_of(
            st.tuples(st.just("not"), st.sampled_from(["NOT", "not", "Not"]),
                      st.lists(children, min_size=1, max_size=1)),
            st.tuples(st.just("paren"), st.just(""), st.lists(children, min_size=1, max_size=1)),
            st.tuples(st.just("and"), st.sampled_from(["AND", "and", ""]),
                      st.lists(children, min_size=2, max_size=3)),
            st.tuples(st.just("or"), st.sampled_from(["OR", "or", "oR"]),
                      st.lists(children, min_size=2, max_size=3)),
        ).map(combine)
    return st.recursive(st.integers(0, n_terms - 1).map(leaf), extend, max_leaves=7)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_queries_match_the_model(world, terms, data):
    rows = world[1]
    universe = {r.dentry for r in rows}
    q = data.draw(queries(len(terms)))
    text = q.text
    sets: list = [None] * len(terms)
    for k in sorted(range(len(terms)), key=lambda k: -k):  # "#12" before "#1"
        if f"#{k}" in text:
            text = text.replace(f"#{k}", terms[k][0])
            sets[k] = select(rows, terms[k][1])
    assert run(world, text) == q.eval(universe, sets), text


# --- index use ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,index", [
    ("size>10G", "inodes_size"),
    ("mtime<1h", "inodes_mtime"),
    ("xattr:user.project=apollo", "xattrs_name"),
    ("name:report*", "dentries_name"),
    ("name:invoice.pdf", "dentries_name"),
])
def test_queries_use_indexes(world, text, index):
    db, _rows, paths = world
    sql, params = compile_where(parse(text), paths.get, NOW)
    plan = " | ".join(str(r[-1]) for r in db.rows(
        "EXPLAIN QUERY PLAN SELECT d.id FROM dentries d JOIN inodes i ON i.id = d.inode "
        f"WHERE {sql}", params))
    assert index in plan, plan


# --- parsing details and errors -------------------------------------------------------------


def test_dates_are_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    try:
        sql, params = compile_where(parse("mtime>2026-01-01"), lambda p: None, 0)
        assert params == [1767193200 * S]  # 2025-12-31T15:00Z
        sql, params = compile_where(parse("ctime=2026-01-01T09:00"), lambda p: None, 0)
        assert params == [1767225600 * S, 1767225660 * S]
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_keeps_text_and_rejects_nothing_valid():
    q = parse('  name:"my file*.txt"  ')
    assert q.text == '  name:"my file*.txt"  '
    assert q == parse('  name:"my file*.txt"  ')
    for text in ["size>10MB", "size>10mib", "size>=512", "size<1.5T", "size=0", "size>1.5",
                 "mtime>=2026-01-01T10:00:59", "ATIME<3W", "Ext:PDF", "type:L", "xattr:a=b=c",
                 'name:a"b c"d', 'tag:" x "', "state:LOCAL", "owner:0 OR group:0"]:
        parse(text)


def test_error_format():
    with pytest.raises(QueryError) as info:
        parse("(ext:pdf size")
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.message, e.position, e.query) == ("expected an operator after 'size'", 13,
                                                "(ext:pdf size")
    assert str(e) == ("query error at column 14: expected an operator after 'size'\n"
                      "(ext:pdf size\n" + " " * 13 + "^")
    with pytest.raises(QueryError) as info:
        parse("(ext:pdf size>1")
    assert str(info.value).startswith(
        "query error at column 16: expected ')' to close '(' at column 1\n")


@pytest.mark.parametrize("text,position,message", [
    ("", 0, "empty query"),
    ("   ", 0, "empty query"),
    ("colour:red", 0, "unknown field 'colour'"),
    ("ext:pdf Size:1 foo:2", 12, "takes a comparison"),
    ("ext:pdf foo:2", 8, "unknown field 'foo'"),
    ("invoice", 0, "expected a term like name:GLOB, found 'invoice'"),
    ("ext:pdf name", 12, "expected an operator after 'name'"),
    ("name:", 5, "missing value after 'name:'"),
    ("size> 3", 5, "missing value after 'size>'"),
    ('name:"" ext:a', 5, "missing value"),
    ("tag:(x)", 4, "missing value"),
    ("size>3X", 5, "bad size '3X'"),
    ("size>-3", 5, "bad size"),
    ("size>K", 5, "bad size"),
    ("size>10iB", 5, "bad size"),
    ("size>1..5M", 5, "bad size"),
    ("mtime<7", 6, "bad time '7'"),
    ("mtime<7x", 6, "bad time"),
    ("mtime>2026-13-01", 6, "bad date '2026-13-01'"),
    ("mtime>2026-02-30", 6, "bad date"),
    ("mtime>2026-01-01T25:00", 6, "bad date"),
    ("mtime>2026-1-1", 6, "bad time"),
    ("atime=7d", 6, "'atime=' needs a date"),
    ("type:folder", 5, "unknown type 'folder'"),
    ("state:gone", 6, "unknown state 'gone'"),
    ("ext:.", 4, "missing extension"),
    ("xattr:=x", 6, "missing attribute name"),
    ("tag:a,b", 4, "cannot contain ','"),
    ('tag:" "', 4, "empty tag"),
    ("under:docs", 6, "starting '/'"),
    ("(ext:pdf", 8, "expected ')' to close '(' at column 1"),
    ("ext:a ((ext:b) OR ext:c", 23, "expected ')' to close '(' at column 7"),
    ("ext:pdf)", 7, "unexpected ')' with no matching '('"),
    ("()", 1, "expected a term after '(', found ')'"),
    ("ext:pdf AND", 11, "expected a term after 'AND'"),
    ("ext:pdf OR ", 11, "expected a term after 'OR'"),
    ("NOT", 3, "expected a term after 'NOT'"),
    ("ext:a NOT", 9, "expected a term after 'NOT'"),
    ("AND ext:pdf", 0, "expected a term, found 'AND'"),
    ("ext:a OR AND ext:b", 9, "expected a term after 'OR', found 'AND'"),
    ("(OR ext:a)", 1, "expected a term after '(', found 'OR'"),
    ("ext:a (AND)", 7, "found 'AND'"),
    ("ext:a NOT)", 9, "expected a term after 'NOT', found ')'"),
    ('name:"abc', 5, "unterminated quoted string"),
    ('ext:a name:x"abc', 12, "unterminated quoted string"),
    ('name:"a\\nb"', 7, "can be escaped"),
    ("name>3", 4, "'name' takes ':'"),
    ("type=dir", 4, "'type' takes ':'"),
    ("size:3", 4, "'size' takes a comparison"),
    ("mtime:7d", 5, "'mtime' takes a comparison"),
    ("-ext:pdf", 0, "use NOT"),
    ("ext:a 10M", 6, "unexpected '1'"),
])
def test_errors(text, position, message):
    with pytest.raises(QueryError) as info:
        parse(text)
    e = info.value
    assert message in e.message, e.message
    assert (e.position, e.query) == (position, text), str(e)


@pytest.mark.parametrize("text,position,message", [
    ("ext:a owner:no-such-user-xyz", 12, "unknown user 'no-such-user-xyz'"),
    ("group:no-such-group-xyz", 6, "unknown group 'no-such-group-xyz'"),
])
def test_compile_errors(text, position, message):
    q = parse(text)
    with pytest.raises(QueryError) as info:
        compile_where(q, lambda p: None, NOW)
    assert (info.value.message, info.value.position) == (message, position)
