#!/usr/bin/env python3
"""The crate's module graph: which top-level module of src/ uses which.

Reads every `crate::a::...` path in src/ (in `use` lines and inline paths;
`cloudstack_image_server::a` in src/main.rs) and reduces it to an edge
between top-level modules (src/http/handlers.rs is `http`, src/nbd/*.rs is
`nbd`). Prints the edges, then checks:

- no cycle: no module uses one that uses it back (directly or through
  others);
- the declared order: docs/architecture.md names the modules lowest first on
  a line `<!-- layers: a b c ... -->`; every module must be listed, and each
  may use only modules listed before it.

Usage: scripts/layers.py [--check]   (--check: exit 1 on a violation)
Run by `make lint`.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
PATH = re.compile(r"\b(?:crate|cloudstack_image_server)::(\{[^}]*\}|[a-z_][a-z0-9_]*)")
COMMENT = re.compile(r"//.*")


def module_of(path):
    rel = path.relative_to(SRC)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return rel.stem


def targets(group):
    """`a` or `{a, b::c, self}` -> top-level names."""
    if not group.startswith("{"):
        return [group]
    names = []
    for part in group[1:].split(","):
        name = part.strip().split("::")[0].strip()
        if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name != "self":
            names.append(name)
    return names


def graph():
    modules = set()
    edges = {}
    for path in sorted(SRC.rglob("*.rs")):
        if path.name == "lib.rs" and path.parent == SRC:
            continue
        src_mod = module_of(path)
        modules.add(src_mod)
        text = "\n".join(COMMENT.sub("", line) for line in path.read_text().splitlines())
        for m in PATH.finditer(text):
            for dst in targets(m.group(1)):
                known = (SRC / dst).is_dir() or (SRC / f"{dst}.rs").exists()
                if known and dst != src_mod:
                    edges.setdefault(src_mod, set()).add(dst)
    return modules, edges


def cycles(modules, edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return out


def declared_order():
    if not DOC.exists():
        return None
    m = re.search(r"<!--\s*layers:\s*([a-z0-9_ ]+?)\s*-->", DOC.read_text())
    return m.group(1).split() if m else None


def main():
    check = "--check" in sys.argv[1:]
    modules, edges = graph()
    order = declared_order()
    rank = {m: i for i, m in enumerate(order or [])}
    listing = order + sorted(modules - set(order)) if order else sorted(modules)
    for m in listing:
        if m in modules:
            uses = sorted(edges.get(m, ()), key=lambda d: (rank.get(d, len(rank)), d))
            print(f"{m:<13} -> {' '.join(uses) if uses else '(nothing)'}")
    problems = []
    for comp in cycles(modules, edges):
        problems.append(f"cycle: {' <-> '.join(comp)}")
    if order is None:
        problems.append(f"no `<!-- layers: ... -->` line in {DOC.relative_to(ROOT)}")
    else:
        for m in sorted(modules - set(order)):
            problems.append(f"module {m} is not in the declared layers")
        for src_mod, dsts in sorted(edges.items()):
            for dst in sorted(dsts):
                if src_mod in rank and dst in rank and rank[dst] >= rank[src_mod]:
                    problems.append(f"{src_mod} uses {dst}, which is not below it in the declared layers")
    for p in problems:
        print(f"layers: {p}", file=sys.stderr)
    if not problems:
        print("layers: no cycles; every module uses only modules below it", file=sys.stderr)
    return 1 if problems and check else 0


if __name__ == "__main__":
    sys.exit(main())
