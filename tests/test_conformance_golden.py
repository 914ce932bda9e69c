"""Golden dumps from Python: one manifest op run on a DUT or a function (conformance.run_golden_op), manifest
records read as Op records (refvit.graph.op_from_manifest), a `golden --ops` subset read as a graph
(graph_from_dicts(open_inputs=True)), and compare_arrays / Diff.ok as public API."""
from __future__ import annotations

import numpy as np
import pytest

import conformance
from conformance.cases import random_quantized_model
from refvit import golden, int_model
from refvit import int_kernels as K
from refvit.check import CheckUsageError, Diff, compare_arrays, load_manifest
from refvit.graph import GraphError, graph_from_dicts, op_from_manifest
from refvit.intmath import SINGLE_ROUND


@pytest.fixture(scope="module")
def model():
    qm, calib = random_quantized_model(48, 2, 3, 32, 8, True, SINGLE_ROUND)
    return qm, int_model.quantize_input(qm, calib[:2])                  # int8 (2, 3, 32, 32)


@pytest.fixture(scope="module")
def full_dump(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "full"
    golden.write_golden(*model, out, formats=("npy",), internals=True)
    return out


@pytest.fixture(scope="module")
def subset_dump(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "mlp"
    golden.write_golden(*model, out, formats=("npy", "hex"), ops=["blocks.0.mlp.*", "blocks.0.residual2"])
    return out


def test_every_manifest_op_reruns_on_refvit(full_dump, model):
    """Each op on its own dumped inputs, through RefvitDUT's method for its (op, variant): equal to the dump."""
    manifest = load_manifest(full_dump)
    names = [e["name"] for e in manifest["ops"]]
    assert names == [op.name for op in model[0].graph]
    diffs = {n: conformance.run_golden_op(full_dump, n, conformance.RefvitDUT()) for n in names}
    assert {n: d.status for n, d in diffs.items() if not d.ok} == {}
    assert all(isinstance(d, Diff) and d.total > 0 for d in diffs.values())


def test_a_function_or_a_partial_dut(full_dump):
    fc1 = "blocks.0.mlp.fc1"
    assert conformance.run_golden_op(full_dump, fc1, lambda **kw: K.conv2d(**kw)).ok

    def shifted(x, weight, bias, multiplier, shift, **attrs):      # one more shift: about half the values
        return K.conv2d(x, weight, bias, multiplier, np.asarray(shift) + 1, **attrs)
    diff = conformance.run_golden_op(full_dump, fc1, shifted)
    assert not diff.ok and diff.status == "MISMATCH" and diff.max_abs_diff >= 1

    class ConvOnly(conformance.DUT):
        conv2d = staticmethod(K.conv2d)
    assert conformance.run_golden_op(full_dump, fc1, ConvOnly()).ok
    assert conformance.run_golden_op(full_dump, "blocks.0.attn.q", ConvOnly()).ok      # data movement: refvit's
    with pytest.raises(NotImplementedError, match="ConvOnly does not implement softmax"):
        conformance.run_golden_op(full_dump, "blocks.0.attn.softmax", ConvOnly())
    with pytest.raises(CheckUsageError, match="has no op 'blocks.9.mlp.fc1'"):
        conformance.run_golden_op(full_dump, "blocks.9.mlp.fc1", ConvOnly())

    class Raises(conformance.DUT):
        def conv2d(self, *args, **kwargs):
            raise OSError("device timeout")
    with pytest.raises(OSError, match="device timeout"):          # the DUT's own exception, as it is
        conformance.run_golden_op(full_dump, fc1, Raises())


def test_the_dut_output_is_reshaped_to_the_record(full_dump):
    flat = conformance.run_golden_op(full_dump, "blocks.0.mlp.gelu", lambda x, table: K.gelu(x, table).reshape(-1))
    assert flat.ok
    wrong = conformance.run_golden_op(full_dump, "blocks.0.mlp.gelu", lambda x, table: K.gelu(x, table)[:, :, :, :1])
    assert wrong.status == "BAD SHAPE"


def test_manifest_records_read_as_op_records(full_dump, model):
    manifest = load_manifest(full_dump)
    entry = next(e for e in manifest["ops"] if e["name"] == "blocks.0.norm1")
    assert {"index", "internals"} <= set(entry)                  # what the manifest adds (internals=True)
    graph = {op.name: op for op in model[0].graph}
    assert op_from_manifest(entry) == graph["blocks.0.norm1"]
    assert graph_from_dicts(manifest["ops"]) == model[0].graph
    with pytest.raises(GraphError, match="bad op record"):
        op_from_manifest(dict(entry, extra=1))


def test_a_golden_ops_subset_reads_as_a_graph(subset_dump, model):
    manifest = load_manifest(subset_dump)
    records = manifest["ops"]
    assert [r["name"] for r in records] == ["blocks.0.mlp.fc1", "blocks.0.mlp.gelu", "blocks.0.mlp.fc2",
                                            "blocks.0.residual2"]
    with pytest.raises(GraphError, match="reads 'blocks.0.norm2' before any op writes it"):
        graph_from_dicts(records)
    part = graph_from_dicts(records, open_inputs=True)
    assert part == tuple(op for op in model[0].graph if op.name in {r["name"] for r in records})
    with pytest.raises(GraphError, match="reads 'blocks.0.mlp.gelu' before"):   # order inside the part still counts
        graph_from_dicts([records[2], records[1]], open_inputs=True)
    for r in records:                                             # inputs from outside the part are in the dump
        assert conformance.run_golden_op(subset_dump, r["name"], conformance.RefvitDUT()).ok


def test_compare_arrays_is_public():
    a = np.array([[1, 2], [3, 4]], np.int8)
    assert compare_arrays(a, a.copy()).ok and compare_arrays(a, a.copy()).status == "OK"
    d = compare_arrays(a, np.array([[1, 2], [5, 3]], np.int8))
    assert not d.ok and (d.index, d.expected, d.actual, d.mismatches, d.max_abs_diff) == ((1, 0), 3, 5, 2, 2)
    assert compare_arrays(a, np.array([[1, 2], [4, 4]], np.int8), atol=1).ok        # WITHIN passes
    assert not compare_arrays(a, a.astype(np.int16)).ok and not compare_arrays(a, a.reshape(4)).ok
