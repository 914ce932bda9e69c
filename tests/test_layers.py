"""The layers of the code: every module imports downward only, with no cycle, in the layers that
docs/architecture.md ("The layers") states -- read from that page, so the rule and the page cannot drift.

The table's rows (bottom up) are the stack; a module there is named in the "modules" column (a module that a
row's text marks "(lowest row)" belongs to the bottom row). The bullets under "Beside the stack" are columns
beside it: SIDE_COLUMNS says which row each may be imported from (a new bullet needs a line there). A new
module needs a line in the page, nothing in this file."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# bullet title under "Beside the stack" -> the row of the table whose rank the column shares: a module of the
# column may import the rows up to it, and the rows from it up may import the column.
SIDE_COLUMNS = {
    "Float model": "integer arithmetic, errors",             # "depend on nothing but NumPy and the config"
    "Weight importer, the lowest layer": "weight importer",  # "imports NumPy and safetensors only, never refvit"
    "Conformance": "applications",                          # "beside refvit ... uses its public API only"
}

_PATH = re.compile(r"`((?:\w+/)+(?:\w+\.py)?)`")            # `refvit/graph.py`, `refvit/checkpoints/`, `conformance/`
_LOWEST = re.compile(r"`((?:\w+/)+\w+\.py)` \(lowest row\)")


def module_of(path: str) -> str:
    """A path as the page writes it -> a module name; a folder stands for its whole package (`name*`)."""
    if path.endswith("/"):
        return path.rstrip("/").replace("/", ".") + "*"
    name = path[:-len(".py")].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def documented_layers(text: str) -> tuple[list, dict]:
    """(layers bottom up as lists of module names, {row title: index}) from the page's "The layers" section."""
    section = _section(text, "## The layers")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, rows = rows[0], rows[2:]                                         # rows[1]: the |---| line
    col = header.index("modules")
    rows = rows[::-1]                                                        # bottom first
    layers = [[module_of(p) for p in _PATH.findall(r[col])] for r in rows]
    index = {r[0]: i for i, r in enumerate(rows)}
    for r in rows:
        layers[0] += [module_of(p) for p in _LOWEST.findall(" ".join(r))]
    beside = section[section.index("Beside the stack"):]
    titles = []
    for bullet in re.split(r"\n\* ", beside)[1:]:
        title = re.match(r"\*\*(.+?)\*\*", bullet).group(1)
        titles.append(title)
        assert title in SIDE_COLUMNS, f"a new column beside the stack, {title!r}: say in SIDE_COLUMNS where it sits"
        layers[index[SIDE_COLUMNS[title]]] += [module_of(p) for p in _PATH.findall(bullet)]
    assert sorted(titles) == sorted(SIDE_COLUMNS), f"SIDE_COLUMNS names columns the page no longer has: {titles}"
    return layers, index


LAYERS, ROWS = documented_layers(ARCHITECTURE.read_text())
PACKAGES = sorted({m.split(".")[0].rstrip("*") for layer in LAYERS for m in layer})   # the folders scanned


def _matches(module: str, entry: str) -> bool:
    return module == entry or (entry.endswith("*") and (module == entry[:-1] or module.startswith(entry[:-1] + ".")))


def rank(module: str) -> int:
    ranks = [i for i, layer in enumerate(LAYERS) if any(_matches(module, m) for m in layer)]
    assert ranks, f"{module} is in no layer: add it to the table in docs/architecture.md"
    assert len(ranks) == 1, f"{module} is in several layers of docs/architecture.md: {ranks}"
    return ranks[0]


def _modules() -> dict:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def imports() -> dict:
    """module -> the modules of the scanned packages it imports (ast: absolute and relative imports)."""
    mods = _modules()
    edges = {}
    for name, f in mods.items():
        here = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[:len(here.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found |= set(subs) if subs else {target}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[name] = {m for m in found if m in mods and m != name}
    return edges


def _bare_packages(edges: dict) -> set:
    """Packages whose __init__ imports nothing (refvit's: its version; refvit.data: a resource folder): any
    module may import them, and they need no row."""
    return {m for m, f in _modules().items() if f.name == "__init__.py" and not edges[m]}


# ---------------------------------------------------------------- the page itself

def test_the_page_gives_the_layers():
    assert "weights_tools*" in LAYERS[0] and "refvit.prune" in LAYERS[1]
    assert "refvit.cli" in LAYERS[-1] and "refvit.graph" in LAYERS[ROWS["graph + interpreter"]]
    assert ROWS["op registry"] < ROWS["graph + interpreter"] < ROWS["quantized model and file"] < \
        ROWS["quantizer, integer model"] < ROWS["applications"]
    assert "refvit.registry" in LAYERS[ROWS["op registry"]] and "refvit.reference*" in LAYERS[ROWS["op registry"] - 1]
    assert "refvit.model_conv" in LAYERS[ROWS["integer arithmetic, errors"]]
    assert "refvit.checkpoints*" in LAYERS[ROWS["weight importer"]] and "refvit.intmath" in LAYERS[1]
    assert "conformance*" in LAYERS[ROWS["applications"]]
    assert {"conformance", "refvit"} <= set(PACKAGES)                         # the packages scanned


def test_the_parser_sees_a_changed_table():
    text = ARCHITECTURE.read_text()
    moved = text.replace("| `refvit/graph.py` |", "| `refvit/graph.py`, `refvit/golden.py` |")
    assert moved != text
    layers, rows = documented_layers(moved)
    assert "refvit.golden" in layers[rows["graph + interpreter"]]
    with pytest.raises(AssertionError, match="new column beside the stack"):
        documented_layers(text.replace("* **Conformance**", "* **Plugins**"))


def test_every_module_is_in_exactly_one_layer():
    edges = imports()
    roots = _bare_packages(edges)
    for module in edges:
        if module not in roots:
            rank(module)


# ---------------------------------------------------------------- the rule

def test_imports_go_downward_and_have_no_cycle():
    edges = imports()
    roots = _bare_packages(edges)
    for a, targets in edges.items():
        for b in targets - roots:
            assert rank(b) <= rank(a), f"{a} (layer {rank(a)}) imports {b} (layer {rank(b)}): see docs/architecture.md"
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in edges.get(n, ()):
            assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
            if m not in state:
                visit(m, path + [m])
        state[n] = "done"
    for n in edges:
        if n not in state:
            visit(n, [n])


def test_no_test_imports_another_test_file():
    for f in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0].startswith("test_") for n in names), f"{f.name} imports {names}"
