#!/usr/bin/env python3
"""No module imports from a module that imports it back.

For every library and binary crate of the workspace (each `src/lib.rs`,
`src/main.rs` and `src/bin/*.rs` reached through its `mod` declarations;
a module is a file, `foo/mod.rs` is module `foo`), builds the graph of
which module refers to which, and fails when two modules refer to each
other, parent and child included. A module refers to another when it

- `use`s something from it (`use crate::a::b::X`, `use super::Y`,
  `use self::child::Z`, `use child::W` in the parent, nested groups too), or
- names a path into it in code (`crate::a::f()`, `super::g()`,
  `child::h()`, or through a module it imported: `use crate::a; a::b::f()`).

A re-export is an import too: a `mod.rs` or `lib.rs` that says
`pub use child::X` depends on `child`. A path to an item that a module only
imports is followed to where the item is defined, so naming `super::X`
(re-exported from `child`) depends on `child`, not on the parent.

Ignored: comments, string literals, `#[cfg(test)]` items (a
`mod tests { use super::*; }` is part of testing the file, not of its
design), and paths into other crates.

Cycles through more than two modules are listed too, as a warning.

Usage: scripts/check-cycles.py [--allow FILE] [ROOT]
  ROOT defaults to the repository (this script's parent directory).
  FILE (default scripts/cycles-allow.txt) lists pairs that are still
  expected, one `crate: a <-> b` a line; `#` starts a comment.
Exit status: 0 clean, 1 a pair not allowed, 2 bad usage.
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
KEYWORD_ROOTS = {"crate", "super", "self", "Self"}


# ---------------------------------------------------------------- lexing


def strip(src):
    """The source with comments, string and char literals blanked out
    (newlines kept), so paths inside them are not seen."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if src[i] == "\n":
                        out.append("\n")
                    i += 1
            out.append(" ")
        elif c in "rb" and re.match(r'(?:br|r)#*"', src[i:i + 260]) and not _ident_before(src, i):
            m = re.match(r'(?:br|r)(#*)"', src[i:])
            end = src.find('"' + m.group(1), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * src.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]*\}|.)|[^\\'])'", src[i:])
            if m:
                out.append("' '")
                i += m.end()
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _ident_before(src, i):
    return i > 0 and (src[i - 1].isalnum() or src[i - 1] == "_")


def skip_balanced(text, i, open_, close):
    """Index just past the `close` matching the `open_` at `i`."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def skip_item(text, i):
    """Index just past the item starting at `i` (its `;`, or its `{...}`)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == ";" and depth == 0:
            return i + 1
        elif c == "{" and depth == 0:
            return skip_balanced(text, i, "{", "}")
        i += 1
    return len(text)


CFG_TEST = re.compile(r"#\[cfg\(\s*(?:all\(\s*)?test\b[^\]]*\]")


def drop_test_items(text):
    """`text` without the items marked `#[cfg(test)]`."""
    while True:
        m = CFG_TEST.search(text)
        if not m:
            return text
        i = m.end()
        # further attributes on the same item
        while True:
            a = re.match(r"\s*#\[", text[i:])
            if not a:
                break
            i = skip_balanced(text, i + a.end() - 1, "[", "]")
        end = skip_item(text, i)
        text = text[:m.start()] + "\n" * text.count("\n", m.start(), end) + text[end:]


# ---------------------------------------------------------------- use trees

USE = re.compile(r"(?<![A-Za-z0-9_])(pub(?:\s*\([^)]*\))?\s+)?use\s+([^;]*);")


def use_leaves(tree):
    """`a::{b, c::{d as e, self}}` -> [(['a','b'], 'b'), (['a','c','d'], 'e'), (['a','c'], 'c')]."""
    tree = re.sub(r"\s+", "", tree)
    leaves = []

    def walk(prefix, s):
        for part in split_top(s):
            if not part:
                continue
            brace = part.find("{")
            if brace >= 0:
                head = [p for p in part[:brace].split("::") if p]
                walk(prefix + head, part[brace + 1:part.rindex("}")])
                continue
            alias = None
            if "as" in part and re.search(r"[A-Za-z0-9_]as[A-Za-z_]", part):
                # whitespace was removed: `dasx` is `d as x`; find it on segment boundary
                m = re.match(r"(.*?[A-Za-z0-9_])as(" + IDENT + r")$", part)
                if m and "::" not in m.group(2):
                    part, alias = m.group(1), m.group(2)
            segs = [p for p in part.split("::") if p]
            if segs and segs[-1] == "self":
                segs = segs[:-1]
            path = prefix + segs
            if not path:
                continue
            leaves.append((path, alias or path[-1]))

    walk([], tree)
    return leaves


def split_top(s):
    parts, depth, cur = [], 0, []
    for c in s:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def parse_uses(src):
    """Use statements with their whitespace restored for alias parsing."""
    uses = []
    for m in USE.finditer(src):
        tree = m.group(2)
        # `d as e` loses its spaces in use_leaves; mark them first
        tree = re.sub(r"\s+as\s+", " as ", tree)
        tree = tree.replace(" as ", "as")
        uses.append((bool(m.group(1)), use_leaves(tree), m.start(), m.end()))
    return uses


# ---------------------------------------------------------------- crates


class Module:
    def __init__(self, path, file, is_dir_owner):
        self.path = path  # tuple of names, () for the crate root
        self.file = file
        self.is_dir_owner = is_dir_owner  # lib.rs, main.rs, mod.rs: children beside it
        self.children = {}
        self.text = ""
        self.bindings = {}  # local name -> absolute path (tuple) or None (other crate)


MOD_DECL = re.compile(r"(?<![A-Za-z0-9_])(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;")


def load_crate(root_file):
    modules = {}

    def load(path, file, owner):
        m = Module(path, file, owner)
        with open(file, encoding="utf-8") as f:
            m.text = drop_test_items(strip(f.read()))
        modules[path] = m
        base = os.path.dirname(file) if owner else os.path.splitext(file)[0]
        for d in MOD_DECL.finditer(m.text):
            name = d.group(1)
            flat = os.path.join(base, name + ".rs")
            nested = os.path.join(base, name, "mod.rs")
            if os.path.exists(flat):
                m.children[name] = load(path + (name,), flat, False)
            elif os.path.exists(nested):
                m.children[name] = load(path + (name,), nested, True)
        return m

    load((), root_file, True)
    return modules


def absolute(mod, segs):
    """An in-crate path as written in `mod` -> absolute segments, or None
    when it leads outside the crate."""
    if not segs:
        return None
    head = segs[0]
    if head == "crate":
        return tuple(segs[1:])
    if head in ("self", "super"):
        base = list(mod.path)
        i = 0
        if head == "self":
            i = 1
        while i < len(segs) and segs[i] == "super":
            if not base:
                return None
            base.pop()
            i += 1
        return tuple(base) + tuple(segs[i:])
    if head in mod.children:
        return mod.path + tuple(segs)
    return None


def resolve(modules, path, seen=None):
    """Absolute path of an item -> the module defining it (following
    imports), or None when it is in another crate."""
    seen = seen or set()
    if path in seen:
        return None
    seen.add(path)
    # longest prefix that is a module
    k = len(path)
    while k > 0 and path[:k] not in modules:
        k -= 1
    owner = modules[path[:k]]
    rest = path[k:]
    if not rest:
        return owner.path
    name = rest[0]
    if name in owner.bindings:
        target = owner.bindings[name]
        if target is None:
            return None
        return resolve(modules, target + rest[1:], seen)
    if name in owner.children:  # only possible when k stopped early; defensive
        return owner.path + (name,)
    return owner.path


def analyse(modules):
    # bindings first (a path may go through any module's imports)
    for mod in modules.values():
        for _, leaves, _, _ in parse_uses(mod.text):
            for segs, alias in leaves:
                if segs[-1] != "*":
                    mod.bindings[alias] = absolute(mod, segs)
    edges = {p: {} for p in modules}  # module -> {module it refers to: first line}
    path_re = re.compile(r"(?<![A-Za-z0-9_:])(" + IDENT + r")((?:\s*::\s*" + IDENT + r")+|\s*::\s*\*)")
    for mod in modules.values():

        def add(abs_path, line):
            if abs_path is None:
                return
            target = resolve(modules, abs_path)
            if target is not None and target != mod.path:
                edges[mod.path].setdefault(target, line)

        code = mod.text
        for _, leaves, start, end in parse_uses(mod.text):
            code = code[:start] + " " * (end - start) + code[end:]
            for segs, _ in leaves:
                add(absolute(mod, segs[:-1] if segs[-1] == "*" else segs), line_of(mod.text, start))
        for m in path_re.finditer(code):
            segs = [m.group(1)] + [s for s in re.split(r"\s*::\s*", m.group(2)) if s]
            head = segs[0]
            if head in KEYWORD_ROOTS or head in mod.children:
                add(absolute(mod, segs), line_of(code, m.start()))
            elif head in mod.bindings and mod.bindings[head] is not None:
                add(mod.bindings[head] + tuple(segs[1:]), line_of(code, m.start()))
    return edges


def line_of(text, i):
    return text.count("\n", 0, i) + 1


def sccs(graph):
    """Strongly connected components of more than one module."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [sorted(c) for c in out if len(c) > 1]


def rel(file, root):
    return os.path.relpath(file, root)


def name(path):
    return "::".join(path) or "crate"


def crate_roots(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("target", ".git", "node_modules") and not d.startswith(".")]
        if "Cargo.toml" not in filenames:
            continue
        with open(os.path.join(dirpath, "Cargo.toml"), encoding="utf-8") as f:
            m = re.search(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', f.read(), re.M | re.S)
        if not m:
            continue
        src = os.path.join(dirpath, "src")
        for rel in ("lib.rs", "main.rs"):
            if os.path.exists(os.path.join(src, rel)):
                yield m.group(1) + ("" if rel == "lib.rs" else " (bin)"), os.path.join(src, rel)
        bins = os.path.join(src, "bin")
        if os.path.isdir(bins):
            for b in sorted(os.listdir(bins)):
                if b.endswith(".rs"):
                    yield "%s (bin %s)" % (m.group(1), b[:-3]), os.path.join(bins, b)


def read_allow(file):
    allowed = set()
    if not file or not os.path.exists(file):
        return allowed
    with open(file, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"(.+?):\s*(\S+)\s*<->\s*(\S+)$", line)
            if not m:
                sys.exit("%s: cannot read `%s` (want `crate: a <-> b`)" % (file, line))
            allowed.add((m.group(1).strip(),) + tuple(sorted((m.group(2), m.group(3)))))
    return allowed


def main(argv):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    allow_file = os.path.join(here, "scripts", "cycles-allow.txt")
    args = list(argv)
    root = here
    while args:
        a = args.pop(0)
        if a == "--allow" and args:
            allow_file = args.pop(0)
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        elif not a.startswith("-"):
            root = a
        else:
            print(__doc__, file=sys.stderr)
            return 2
    allowed = read_allow(allow_file)
    failed, seen_allowed, longer = [], set(), []
    for crate, file in sorted(crate_roots(root)):
        modules = load_crate(file)
        graph = analyse(modules)
        for a in sorted(graph):
            for b in sorted(graph[a]):
                if a < b and a in graph[b]:
                    key = (crate, name(a), name(b))
                    key = (crate,) + tuple(sorted(key[1:]))
                    if key in allowed:
                        seen_allowed.add(key)
                    else:
                        failed.append("%s: %s <-> %s" % key)
                        for x, y in ((a, b), (b, a)):
                            failed.append("    %s:%d refers to %s" % (rel(modules[x].file, root), graph[x][y], name(y)))
        for comp in sccs(graph):
            if len(comp) > 2:
                longer.append("%s: %s" % (crate, ", ".join(name(p) for p in comp)))
    for key in sorted(allowed - seen_allowed):
        print("note: allowed pair no longer found, remove it from the allow-list: %s: %s <-> %s" % key)
    for line in longer:
        print("warning: modules that reach each other through others: " + line)
    if seen_allowed:
        print("%d allowed pair(s) still present (see %s)" % (len(seen_allowed), os.path.relpath(allow_file, root)))
    if failed:
        print("modules that import each other:")
        for line in failed:
            print("  " + line)
        return 1
    print("no module imports from a module that imports it back")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
