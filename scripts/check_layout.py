#!/usr/bin/env python3
"""Checks the shape the redesign promised, from the repository root:

* no import circles between the source files of any crate;
* no source file in server/src above 600 lines;
* no libtorch (`tch`, `torch-sys`) in the dependency trees of the crates
  that other programs use without it: nt-spec, nt-common, nt-client,
  nt-fusion, nt-fuzz.

Import circles:

An edge a -> b means file a names an item of file b through a `use` or a
path (`crate::x::y`, `super::x`, `self::x`). Module declarations (`mod x;`)
and re-exports of a child from its parent (`pub use x::...` in mod.rs/lib.rs)
are the module tree, not imports, and are not edges. Exits 1 on a circle.
"""
import os
import re
import subprocess
import sys


def module_files(src):
    """Maps module paths (tuples) to files."""
    files = {}
    for root, _, names in os.walk(src):
        for n in names:
            if not n.endswith(".rs"):
                continue
            path = os.path.join(root, n)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] in ("lib", "main", "mod"):
                rel = rel[:-1]
            files[tuple(rel)] = path
    return files


def resolve(files, current, path):
    """The file of the longest module prefix of `path` seen from `current`."""
    parts = path.split("::")
    if parts[0] == "crate":
        base, parts = (), parts[1:]
    elif parts[0] == "super":
        base = current
        while parts and parts[0] == "super":
            base, parts = base[:-1], parts[1:]
    elif parts[0] == "self":
        base, parts = current, parts[1:]
    else:
        return None
    for n in range(len(parts), -1, -1):
        key = base + tuple(parts[:n])
        if key in files:
            return files[key]
    return None


def edges(files):
    out = {}
    for module, path in files.items():
        text = open(path, encoding="utf-8").read()
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        text = re.sub(r"//[^\n]*", "", text)
        is_parent = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
        targets = set()
        for m in re.finditer(r"\b(?:crate|super|self)(?:::\w+)+(?:::\{[^}]*\})?", text):
            expr = m.group(0)
            line_start = text.rfind("\n", 0, m.start()) + 1
            line = text[line_start:m.start()]
            if is_parent and re.match(r"\s*pub(\([^)]*\))? use self::", line + expr):
                continue
            heads = [expr.split("::{")[0]]
            if "::{" in expr:
                inner = expr.split("::{", 1)[1].rstrip("}")
                heads = [heads[0] + "::" + i.strip().split(" as ")[0]
                         for i in inner.split(",") if i.strip()]
            for h in heads:
                t = resolve(files, module, h)
                if t and t != path:
                    # A child naming its parent's re-export counts as an edge
                    # to the parent; a parent's `pub use child::x` does not.
                    if is_parent and os.path.dirname(t).startswith(os.path.dirname(path)) \
                            and re.match(r"\s*pub(\([^)]*\))? use ", line):
                        continue
                    targets.add(t)
        out[path] = targets
    return out


def cycles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


MAX_SERVER_LINES = 600
TORCH_FREE = ["nt-spec", "nt-common", "nt-client", "nt-fusion", "nt-fuzz"]


def long_files(root):
    out = []
    for dirpath, _, names in os.walk(os.path.join(root, "server", "src")):
        for n in names:
            if n.endswith(".rs"):
                path = os.path.join(dirpath, n)
                lines = sum(1 for _ in open(path, encoding="utf-8"))
                if lines > MAX_SERVER_LINES:
                    out.append((path, lines))
    return out


def torch_in(root, package):
    tree = subprocess.run(
        ["cargo", "tree", "-p", package, "-e", "normal", "--prefix", "none"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    return sorted({l.split()[0] for l in tree.splitlines()
                   if l.split() and l.split()[0] in ("tch", "torch-sys")})


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    bad = 0
    for crate in sorted(os.listdir(root)):
        src = os.path.join(root, crate, "src")
        if not os.path.isfile(os.path.join(root, crate, "Cargo.toml")) or not os.path.isdir(src):
            continue
        for comp in cycles(edges(module_files(src))):
            bad += 1
            print("import circle: " + " <-> ".join(comp))
    for path, lines in long_files(root):
        bad += 1
        print("%s: %d lines (at most %d in server/src)" % (path, lines, MAX_SERVER_LINES))
    if "--no-cargo" not in sys.argv:
        for package in TORCH_FREE:
            found = torch_in(root, package)
            if found:
                bad += 1
                print("%s depends on %s" % (package, ", ".join(found)))
    print("layout checks: %d problem(s)" % bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
