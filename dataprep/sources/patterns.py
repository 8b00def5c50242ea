"""Shard patterns: the ``--data`` of the shard formats (Parquet files, WebDataset tars) turned into the list
of shards it names, each with its identity (size and ETag on S3, size and modification time on disk).

A pattern may hold brace expansions, as in WebDataset's shard lists (``imagenet1k-train-{0000..1023}.tar``:
a zero-padded numeric range; ``{a,b}``: alternatives), and glob wildcards (``*``, ``?``, ``[...]``; they do not
cross ``/``). Shards come in the order of the expansion, the matches of each wildcard pattern sorted by name,
each once. A shard's name is its path relative to the pattern's base (the folder before the first wildcard
or brace), the same on disk and on S3, so that a copy of the shards elsewhere names its images alike.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from shared import object_store as store

SPECIAL = "*?[{"
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class PatternError(ValueError):
    """A pattern that names no shard, or a shard it names that is missing (one line)."""


@dataclass(frozen=True)
class Shard:
    """One shard and what identifies its content: ``etag`` on S3, ``mtime_ns`` on disk (0 where unknown)."""

    name: str  # relative to the pattern's base
    uri: str  # a local path or s3://bucket/key
    size: int
    etag: str = ""
    mtime_ns: int = 0

    def identity(self) -> Tuple[str, int, str, int]:
        return self.name, self.size, self.etag, self.mtime_ns

    def to_dict(self) -> dict:
        d = {"name": self.name, "size": self.size}
        d.update({"etag": self.etag} if self.etag else {"mtime_ns": self.mtime_ns})
        return d


def has_special(text: str) -> bool:
    return any(c in text for c in SPECIAL)


def _matching_brace(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return -1


def _split_top(body: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for c in body:
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        cur += c
    return parts + [cur]


def expand_braces(pattern: str) -> List[str]:
    """Bash-style brace expansion: ``{0000..0003}`` (zero-padded when an end is), ``{a,b}``, nested and
    repeated; a brace with neither a range nor a comma is kept as written."""
    i = pattern.find("{")
    while i >= 0:
        j = _matching_brace(pattern, i)
        if j < 0:
            return [pattern]
        body, head, tail = pattern[i + 1:j], pattern[:i], pattern[j + 1:]
        m = _RANGE.match(body)
        if m:
            a, b = m.group(1), m.group(2)
            padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
            width = max(len(a), len(b)) if padded else 0
            step = 1 if int(b) >= int(a) else -1
            items = [f"{v:0{width}d}" for v in range(int(a), int(b) + step, step)]
        else:
            items = _split_top(body)
            if len(items) < 2:
                i = pattern.find("{", i + 1)
                continue
        return [out for item in items for rest in expand_braces(tail) for out in expand_braces(head + item + rest)]
    return [pattern]


def base_of(pattern: str) -> str:
    """The folder part before the first wildcard or brace, with its trailing slash."""
    cut = min([pattern.find(c) for c in SPECIAL if c in pattern] or [len(pattern)])
    return pattern[:pattern.rfind("/", 0, cut) + 1]


def _regex(rel: str) -> re.Pattern:
    """A glob of one relative path as a regex; ``*`` and ``?`` stay within one path component."""
    out, i = "", 0
    while i < len(rel):
        c = rel[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and "]" in rel[i + 2:]:
            j = rel.index("]", i + 2)
            body = rel[i + 1:j]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body.replace("\\", "\\\\")) + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def match(pattern: str) -> Tuple[str, List[Shard]]:
    """(base, shards) of a pattern, local or s3://; PatternError if it names nothing or a named shard is
    missing. Objects on S3 are listed once, under the base."""
    base = base_of(pattern)
    expanded = expand_braces(pattern)
    if store.is_s3(pattern):
        listed = {k: (size, etag) for k, size, etag in store.list_entries(base) if not k.endswith("/")}
        found: List[Shard] = []
        for p in expanded:
            rel = p[len(base):]
            if any(c in rel for c in "*?["):
                rx = _regex(rel)
                names = sorted((k for k in listed if rx.match(k)), key=lambda k: k.encode())
            elif rel in listed:
                names = [rel]
            else:
                raise PatternError(f"{store.redact(p)}: no such object" + (f" (one of the {len(expanded)} shards "
                                   f"{store.redact(pattern)} names)" if len(expanded) > 1 else ""))
            found += [Shard(k, base + k, listed[k][0], etag=listed[k][1]) for k in names]
    else:
        found = []
        for p in expanded:
            if any(c in p for c in "*?["):
                paths = sorted((q for q in glob.glob(p) if os.path.isfile(q)), key=os.fsencode)
            elif os.path.isfile(p):
                paths = [p]
            else:
                raise PatternError(f"{p}: no such file" + (f" (one of the {len(expanded)} shards {pattern} names)"
                                                           if len(expanded) > 1 else ""))
            for q in paths:
                st = os.stat(q)
                found.append(Shard(q[len(base):], os.path.abspath(q), st.st_size, mtime_ns=st.st_mtime_ns))
    seen, shards = set(), []
    for s in found:
        if s.name not in seen:
            seen.add(s.name)
            shards.append(s)
    if not shards:
        raise PatternError(f"no shard matches {store.redact(pattern)}")
    return base, shards


def changed(recorded: List[dict], current: List[Shard]) -> Optional[str]:
    """How the shards differ from the recorded ones (None: the same), for a one-line refusal."""
    old = {d["name"]: d for d in recorded}
    now = {s.name: s.to_dict() for s in current}
    diffs = []
    for name in sorted(set(old) | set(now)):
        a, b = old.get(name), now.get(name)
        if a is None:
            diffs.append(f"{name} is new")
        elif b is None:
            diffs.append(f"{name} is gone")
        else:
            keys = [k for k in ("size", "etag", "mtime_ns") if a.get(k) != b.get(k)]
            if keys:
                diffs.append(f"{name}: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys))
    if not diffs:
        return None
    return f"{diffs[0]}" + (f" ({len(diffs)} of {len(set(old) | set(now))} shards differ)" if len(diffs) > 1 else "")
