"""The docs stay true to the code.

1. The op tables of docs/spec.md, Part 3 ("The graph": model level and one block) agree with
   `refvit.graph.build_graph` record by record: name, op, variant, inputs and constants by argument (in the
   kernel's argument order), attrs, output dtype and shape, layout, scale, calibrate, weight_scale.
2. Every relative link of docs/*.md and README.md points to an existing file, and every #anchor to a
   heading of its page (GitHub's heading ids).
3. The docs mention every kernel of the op registry (`refvit.registry`): its op type and its function's name.
4. The versions the docs quote are the code's (golden manifest schema, quantized file format).
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from refvit import golden, qfile
from refvit.config import DeiTConfig
from refvit import registry as R
from refvit.graph import block_graph, build_graph
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SPEC = DOCS / "spec.md"
TABLE_HEADER = ["op name", "op", "variant", "inputs", "constants", "attrs", "output", "layout", "scale", "cal."]


def doc_pages() -> list:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def strip_code_blocks(text: str) -> str:
    """The text outside ``` fenced blocks (their lines become empty: line numbers are kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# 1. the op tables of spec.md Part 3 against build_graph
# ---------------------------------------------------------------------------------------------

def part3_text() -> str:
    text = SPEC.read_text(encoding="utf-8")
    start = re.search(r"^# Part 3\b.*$", text, re.M)
    assert start, "docs/spec.md has no '# Part 3' heading"
    end = re.search(r"^# Part \d+\b", text[start.end():], re.M)
    return text[start.start(): start.end() + end.start() if end else len(text)]


def cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def op_tables(text: str) -> list:
    """Every table of `text` whose header is TABLE_HEADER -> a list of its rows (lists of cells)."""
    tables, rows = [], None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            rows = None
            continue
        c = cells(line)
        if c == TABLE_HEADER:
            rows = []
            tables.append(rows)
        elif rows is not None and not set("".join(c)) <= set("-: "):
            rows.append(c)
    return tables


def code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"expected one `code` span, got {cell!r}"
    return m.group(1)


def pairs(cell: str, op_name: str | None = None) -> list:
    """'`a: x, b: y`' -> [('a', 'x'), ('b', 'y')]; a bare `arg` is (arg, '<op_name>.<arg>') when op_name is given."""
    if not cell:
        return []
    out = []
    for item in code(cell).split(","):
        key, sep, value = (s.strip() for s in item.partition(":"))
        if not sep:
            assert op_name is not None, f"{cell!r}: every item needs 'argument: name'"
            value = f"{op_name}.{key}"
        out.append((key, value))
    return out


def dims(cfg: DeiTConfig) -> dict:
    C, P = cfg.embed_dim, cfg.num_prefix_tokens
    return {"B": "B", "1": 1, "C": C, "3C": 3 * C, "4C": cfg.hidden_dim, "N": cfg.num_tokens,
            "Np": cfg.num_patches, "Hh": cfg.num_heads, "D": cfg.head_dim, "K": cfg.num_classes, "P": P,
            "P*C": P * C}


def expected_record(row: list, cfg: DeiTConfig, rounding: str) -> dict:
    """A table row -> the fields of the record it describes, in build_graph's terms."""
    name_cell, op, variant, inputs, constants, attrs, output, layout, scale, cal = row
    depth_last = f"blocks.{cfg.depth - 1}."
    name = code(name_cell)
    d = dims(cfg)

    def attr_value(key, value):
        if value is None:
            assert key == "rounding", f"{name}: bare attr {key!r} (only `rounding` may be bare)"
            return rounding
        return int(value) if value.isdigit() else d.get(value, value)
    attr_items = [(k, v if sep else None) for k, sep, v in
                  ((s.strip() for s in item.partition(":")) for item in code(attrs).split(","))] if attrs else []
    m = re.fullmatch(r"(\w+) \(([^)]*)\)", output)
    assert m, f"{name}: output {output!r} is not 'dtype (shape)'"
    return {
        "name": name, "op": code(op), "variant": code(variant),
        "inputs": [(a, t.replace("blocks.{depth-1}.", depth_last)) for a, t in pairs(inputs)],
        "constants": pairs(constants, name),
        "attrs": {k: attr_value(k, v) for k, v in attr_items},
        "dtype": m.group(1), "shape": tuple(d[s.strip()] for s in m.group(2).split(",")),
        "layout": code(layout), "scale": None if scale in ("—", "-", "") else code(scale),
        "calibrate": {"yes": True, "no": False}[cal],
    }


def actual_record(op) -> dict:
    return {"name": op.name, "op": op.op, "variant": op.variant, "inputs": list(op.inputs.items()),
            "constants": list(op.constants.items()), "attrs": dict(op.attrs), "dtype": op.dtype,
            "shape": tuple(op.shape), "layout": op.layout, "scale": op.scale, "calibrate": op.calibrate}


def documented_records(cfg: DeiTConfig, rounding: str) -> tuple[list, list]:
    tables = op_tables(part3_text())
    assert len(tables) == 2, f"docs/spec.md Part 3 should have 2 op tables (model level, one block), found " \
                             f"{len(tables)} with the header {' | '.join(TABLE_HEADER)}"
    model, block = ([expected_record(r, cfg, rounding) for r in t if r[0].startswith("`")] for t in tables)
    return model, block


CONFIGS = [
    DeiTConfig(),                                                                     # DeiT-Tiny 224, cls head
    DeiTConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10, distilled=True),
    DeiTConfig(img_size=48, patch_size=16, embed_dim=96, depth=2, num_heads=4, mlp_ratio=3.0, num_classes=5),
]


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["tiny224", "fmnist-distilled", "mlp3"])
def test_spec_op_tables_agree_with_build_graph(cfg, rounding):
    graph = build_graph(cfg, rounding)
    model_rows, block_rows = documented_records(cfg, rounding)

    top = [actual_record(op) for op in graph if not op.name.startswith("blocks.")]
    assert [r["name"] for r in model_rows] == [r["name"] for r in top], "model-level op names or order"
    for want, got in zip(model_rows, top):
        assert want == got, f"docs/spec.md Part 3, model-level row {want['name']!r} disagrees with build_graph"

    for i in (0, cfg.depth - 1):
        blk = [actual_record(op) for op in block_graph(graph, i)]
        assert [r["name"] for r in block_rows] == [r["name"] for r in blk], f"block {i}: op names or order"
        for want, got in zip(block_rows, blk):
            assert want == got, f"docs/spec.md Part 3, block row {want['name']!r} disagrees with block {i}"

    assert len(graph) == len(top) + cfg.depth * len(block_rows)
    for op in graph:   # the rule stated under the tables
        want = f"{op.name}.weight_scale" if op.op in ("conv2d", "layernorm") else None
        assert op.weight_scale == want, op.name


def test_op_table_parser_sees_a_wrong_row():
    """The comparison is not vacuous: a row that differs from the record is caught."""
    cfg = CONFIGS[1]
    _, block_rows = documented_records(cfg, SINGLE_ROUND)
    rec = actual_record(block_graph(build_graph(cfg), 0)[2])            # attn.q
    assert block_rows[2] == rec
    row = "| `attn.q` | `split_heads` | `channels` | `qkv: attn.qkv` | | `part: 1, num_heads: Hh` | " \
          "int8 (B, Hh, D, N) | `(B,Hh,D,N)` | `attn.q.scale` | yes |"
    assert expected_record(cells(row), cfg, SINGLE_ROUND) != rec


# ---------------------------------------------------------------------------------------------
# 2. links
# ---------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def github_anchor(heading: str) -> str:
    """GitHub's id of a heading: markup removed, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)           # [text](link) -> text
    text = text.replace("`", "").strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set:
    ids, seen = set(), {}
    for line in strip_code_blocks(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def links(page: Path) -> list:
    text = strip_code_blocks(page.read_text(encoding="utf-8"))
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"`[^`]*`", "``", line)                            # links never sit in code spans
        out += [(lineno, m.group(1)) for m in LINK.finditer(line)]
    return out


def test_github_anchor_rule():
    assert github_anchor("Part 1: integer arithmetic primitives (`refvit/intmath.py`)") == \
        "part-1-integer-arithmetic-primitives-refvitintmathpy"
    assert github_anchor("Kind `resize-crop` (timm's eval transform)") == "kind-resize-crop-timms-eval-transform"
    assert github_anchor("/255 and normalize (float32)") == "255-and-normalize-float32"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page):
    bad = []
    for lineno, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):               # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}:{lineno}: {target} -> no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}:{lineno}: {target} -> no heading #{anchor} in {dest.name}")
    assert not bad, "broken links:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# 3. every kernel is documented; 4. versions
# ---------------------------------------------------------------------------------------------

def all_docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))


def test_docs_mention_every_kernel():
    text = all_docs_text()
    missing = sorted({f"{r.op}/{r.variant}: `{name}`" for r in R.rows()
                      for name in (r.op, r.kernel_name) if f"`{name}`" not in text})
    assert not missing, f"docs/*.md never mention (as `code`): {missing}"


def test_docs_quote_the_code_versions():
    fmt = (DOCS / "golden-format.md").read_text(encoding="utf-8")
    assert f'"schema_version": {golden.SCHEMA_VERSION}' in fmt
    assert f"schema version {golden.SCHEMA_VERSION}" in fmt
    spec = part3_text()
    assert f"format version {qfile.FORMAT_VERSION}" in spec
    assert f"`format_version` | `{qfile.FORMAT_VERSION}`" in spec
    readable = ", ".join(map(str, qfile.READABLE_VERSIONS))
    assert f"reads (({readable}))" in spec


def test_spec_registry_table_is_the_registry():
    spec = (DOCS / "spec.md").read_text(encoding="utf-8")
    start = spec.index("<!-- registry table: generated by refvit.registry.markdown_table() -->")
    end = spec.index("<!-- end of registry table -->")
    assert spec[start:end].split("\n", 1)[1].strip() == R.markdown_table()


def test_golden_format_usage_block_names_every_golden_option(capsys):
    from refvit.cli import main
    assert main(["golden", "--help"]) == 0
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", capsys.readouterr().out)) - {"--help"}
    text = (DOCS / "golden-format.md").read_text(encoding="utf-8")
    start = text.index("python -m refvit golden [")
    block = text[start:text.index("```", start)]
    assert options and not options - set(re.findall(r"(--[a-z][a-z0-9-]+)", block)), options - set(
        re.findall(r"(--[a-z][a-z0-9-]+)", block))
