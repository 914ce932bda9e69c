"""The integer graph as data: the op records and their JSON form (graph_from_dicts), the interpreter
(run_graph, its trace and kernel tables) and block_graph. (The quantizer: test_quantize.py; the quantized file:
test_qfile.py; the golden bits: test_golden.py; the layers of the code: test_layers.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from refvit import graph as G
from refvit import registry as R
from refvit import int_model as im
from refvit.config import DeiTConfig

CFG = DeiTConfig(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2, num_classes=5, distilled=False)


@pytest.fixture(scope="module")
def small(tiny):
    """The tiny quantized model (tests/conftest.py) and three float images."""
    return tiny.qm, tiny.x[:3]


def test_records_round_trip_and_read_in_order():
    graph = G.build_graph(CFG)
    assert G.graph_from_dicts(json.loads(json.dumps([op.to_dict() for op in graph]))) == graph
    seen = {"input"}
    for op in graph:
        assert set(op.inputs.values()) <= seen, op.name
        seen.add(op.name)
        assert R.row(op.op, op.variant).kernel.__name__ == op.kernel
    assert [op.name for op in graph][-3:] == ["norm", "head_input", "head"]
    assert len(graph) == 3 + 15 * CFG.depth + 3     # patch_embed, tokens, embed; 15 per block; norm, head_input, head


def test_graph_from_dicts_rejects_bad_records():
    good = [op.to_dict() for op in G.build_graph(CFG)]
    with pytest.raises(G.GraphError, match="non-empty list"):
        G.graph_from_dicts([])
    with pytest.raises(G.GraphError, match="unknown op"):
        G.graph_from_dicts([dict(good[0], variant="w3")] + good[1:])
    with pytest.raises(G.GraphError, match="before any op writes it"):
        G.graph_from_dicts(good[1:])
    with pytest.raises(G.GraphError, match="written twice"):
        G.graph_from_dicts(good + [good[-1]])


def test_interpreter_frees_tensors_but_trace_keeps_all(small):
    qm, x = small
    tr = im.Trace()
    a = im.logits_int8_model(qm, x, tr)[0]
    assert np.array_equal(a, im.logits_int8_model(qm, x)[0])
    assert list(tr.tensors) == ["input"] + [op.name for op in qm.graph]


def test_a_dut_style_kernel_table_runs_the_same_graph(small):
    """run_graph with another kernel table (as conformance DUTs do) gets the same bits when the kernels agree,
    and a different answer when one kernel differs."""
    qm, x = small
    xq = im.quantize_input(qm, x)
    ref = G.run_graph(qm.graph, qm.tensors, xq)
    calls = []

    def kernels(op):
        calls.append(op.kernel)
        return R.row(op.op, op.variant).kernel
    assert np.array_equal(G.run_graph(qm.graph, qm.tensors, xq, kernels=kernels), ref)
    assert len(calls) == len(qm.graph)

    def broken(op):
        fn = R.row(op.op, op.variant).kernel
        if op.op != "gelu":
            return fn
        return lambda x, table: np.roll(fn(x, table), 1)
    assert not np.array_equal(G.run_graph(qm.graph, qm.tensors, xq, kernels=broken), ref)


def test_block_graph_is_relative_and_runs_alone(small):
    qm, x = small
    tr = im.Trace()
    im.forward_int(qm, im.quantize_input(qm, x), tr)
    blk = G.block_graph(qm.graph, 1)
    assert blk[0].inputs == {"x": "input"} and blk[-1].name == "residual2"
    consts = {c: qm.tensors.get(f"blocks.1.{c}", qm.tensors.get(c)) for c in G.required_constants(blk)
              if c not in G.BOUNDARY_CONSTANTS}
    out = G.run_graph(blk, consts, tr.tensors["blocks.0.residual2"], input_layout=G.TOKENS)
    assert np.array_equal(out, tr.tensors["blocks.1.residual2"])
