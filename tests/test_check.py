"""refvit check (refvit.check): one array against another (`compare_arrays`, shared with the conformance runner),
a device's dumps against a golden dump (`compare_dumps`: execution order, the first divergent op, atol, --ops,
--present, --format, missing and unreadable files), the report, and the refusal of a broken golden folder.

Expected values are computed here: first differing elements by a plain loop over the elements, differences
with Python ints, the order of ops from the quantized model's graph."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refvit import check, dumpfmt
from refvit.cli import main

from goldenfiles import copy_tensors


def run(capsys, *argv):
    """`python -m refvit ARGV...` in-process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_check(gold, actual, capsys):
    code, out, err = run(capsys, "check", gold, actual)
    return code, out + err


@pytest.fixture(scope="module")
def dump(tiny_golden):
    """(folder, manifest, trace, logits): the golden dump of the tiny model (tests/conftest.py), no internals."""
    return tiny_golden()


@pytest.fixture(scope="module")
def inside(tiny_golden):
    """The same with internals (golden --internals)."""
    return tiny_golden(internals=True)


# ---------------------------------------------------------------- one array against another



def first_difference(expected, actual):
    """(index, count, largest |difference|) by a plain loop in row-major order, with Python ints."""
    first, count, largest = None, 0, 0
    for index in np.ndindex(expected.shape):
        e, a = int(expected[index]), int(actual[index])
        if e != a:
            first = first or tuple(int(i) for i in index)
            count += 1
            largest = max(largest, abs(e - a))
    return first, count, largest


def test_dtype_is_checked_before_shape_and_shape_before_values():
    e = np.arange(6, dtype=np.int8).reshape(2, 3)
    d = check.compare_arrays(e, np.zeros((3, 2), np.int16))
    assert (d.status, d.detail) == (check.BAD_DTYPE, "dtype int16, expected int8")
    d = check.compare_arrays(e, np.zeros((3, 2), np.int8))
    assert (d.status, d.detail) == (check.BAD_SHAPE, "shape (3, 2), expected (2, 3)")
    assert d.to_dict()["elements"] is None and d.to_dict()["differ"] is None and d.max_abs_diff is None
    d = check.compare_arrays(e, e.copy())
    assert (d.status, d.total, d.mismatches, d.max_abs_diff) == (check.OK, 6, 0, 0)
    assert d.to_dict()["first"] is None


def test_differences_are_exact_at_the_ends_of_64_bit_and_unsigned_types():
    """int64 -2^63 against 2^63 - 1 differ by 2^64 - 1 (int64 arithmetic would wrap); uint16 0 against 65535."""
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    d = check.compare_arrays(np.array([0, lo], np.int64), np.array([0, hi], np.int64))
    assert (d.status, d.index, d.expected, d.actual, d.max_abs_diff) == (check.MISMATCH, (1,), lo, hi, 2 ** 64 - 1)
    d = check.compare_arrays(np.array([[0, 7]], np.uint16), np.array([[65535, 7]], np.uint16), atol=65534)
    assert (d.status, d.index, d.max_abs_diff) == (check.MISMATCH, (0, 0), 65535)
    assert check.compare_arrays(np.array([5], np.uint16), np.array([4], np.uint16), atol=1).status == check.WITHIN


@settings(max_examples=40)
@given(st.sampled_from(["int8", "int16", "int32", "int64", "uint16"]), st.integers(0, 4),
       st.lists(st.tuples(st.integers(0, 23), st.integers(-3, 3)), max_size=5), st.integers(0, 2 ** 31))
def test_compare_arrays_against_a_plain_loop(dtype, atol, changes, seed):
    info = np.iinfo(dtype)
    expected = np.random.default_rng(seed).integers(info.min, info.max, (2, 3, 4), dtype=dtype, endpoint=True)
    actual = expected.copy()
    flat = actual.reshape(-1)
    for i, by in changes:
        flat[i] = min(max(int(flat[i]) + by, int(info.min)), int(info.max))
    index, count, largest = first_difference(expected, actual)
    d = check.compare_arrays(expected, actual, atol)
    want = check.OK if count == 0 else check.WITHIN if largest <= atol else check.MISMATCH
    assert (d.status, d.mismatches, d.total, d.max_abs_diff) == (want, count, 24, largest)
    if count:
        assert (d.index, d.expected, d.actual) == (index, int(expected[index]), int(actual[index]))
        assert d.describe() == (f"{count} of 24 elements differ; first at index {index}: "
                                f"expected {int(expected[index])}, actual {int(actual[index])}")
        assert d.to_dict()["first"] == {"index": list(index), "expected": int(expected[index]),
                                        "actual": int(actual[index])}


def _result(i, status):
    return check.TensorResult(i, f"op{i}", "add", f"op{i}", check.Diff(status, "why"), f"op{i}.npy")


def test_report_first_divergence_counts_and_verdict(tmp_path):
    """WITHIN passes but is a divergence (the first not exact); counts come in the fixed status order."""
    statuses = [check.OK, check.WITHIN, check.MISSING, check.MISMATCH, check.OK]
    r = check.Report(tmp_path, tmp_path, [_result(i, s) for i, s in enumerate(statuses)], atol=2)
    assert r.first_divergence.op_name == "op1" and not r.ok
    assert list(r.counts().items()) == [("OK", 2), ("WITHIN", 1), ("MISMATCH", 1), ("MISSING", 1)]
    assert r.summary() == "summary: 2 OK, 1 WITHIN 2 LSB, 1 MISMATCH, 1 MISSING of 5 tensors compared; FAIL"
    passing = check.Report(tmp_path, tmp_path, [_result(0, check.OK), _result(1, check.WITHIN)], atol=1)
    assert passing.ok and passing.first_divergence.op_name == "op1"
    assert check.Report(tmp_path, tmp_path, [_result(0, check.OK)]).first_divergence is None


def test_find_dump_prefers_the_tensors_folder_then_npy_hex_bin(tmp_path):
    (tmp_path / "tensors").mkdir()
    for f in ("x.bin", "x.hex", "tensors/x.hex", "y.hex", "y.bin", "z.bin"):
        (tmp_path / f).write_bytes(b"")
    assert check.find_dump(tmp_path, "x") == tmp_path / "tensors" / "x.hex"
    assert check.find_dump(tmp_path, "y") == tmp_path / "y.hex"
    assert check.find_dump(tmp_path, "y", ("bin",)) == tmp_path / "y.bin"
    assert check.find_dump(tmp_path, "z", ("npy", "hex")) is None and check.find_dump(tmp_path, "w") is None


# ---------------------------------------------------------------- dumps against a golden dump

def test_the_first_divergent_op_is_first_in_graph_order_and_missing_files_count(dump, tiny, tmp_path):
    out, _, trace, _ = dump
    device = tmp_path / "dev"
    copy_tensors(out, device)
    order = [op.name for op in tiny.qm.graph]
    late, early = order[-4], order[7]                     # changed in this order: the report is in graph order
    for name in (late, early):
        a = trace.tensors[name].copy()
        a.reshape(-1)[5] = a.reshape(-1)[5] + (1 if a.reshape(-1)[5] < 0 else -1)
        np.save(device / f"{name}.npy", a)
    (device / f"{order[3]}.npy").unlink()
    report = check.compare_dumps(out, device)
    assert [r.tensor for r in report.results] == order
    bad = [(r.tensor, r.diff.status) for r in report.results if not r.ok]
    assert bad == [(order[3], check.MISSING), (early, check.MISMATCH), (late, check.MISMATCH)]
    assert report.first_divergence.tensor == order[3]
    first, count, largest = first_difference(trace.tensors[early], np.load(device / f"{early}.npy"))
    d = next(r.diff for r in report.results if r.tensor == early)
    assert (d.index, d.mismatches, d.max_abs_diff) == (first, count, largest) and (count, largest) == (1, 1)
    within = check.compare_dumps(out, device, atol=1, present=True)
    assert [r.diff.status for r in within.results].count(check.WITHIN) == 2 and within.ok
    assert within.not_compared == [(3, order[3], order[3], check.NOT_DUMPED)]


def test_check_identical_copy_passes(dump, tmp_path, capsys):
    out = dump[0]
    shutil.copytree(out, tmp_path / "copy")
    code, text = run_check(out, tmp_path / "copy", capsys)
    assert code == 0 and "all" in text and "MISMATCH" not in text


def test_check_finds_the_one_changed_element_in_a_flat_hex_dump(dump, tmp_path, capsys):
    out, manifest, trace, _ = dump
    actual = tmp_path / "device"
    actual.mkdir()
    for name, arr in trace.tensors.items():   # the device writes only hex, flat
        (actual / f"{name}.hex").write_bytes(dumpfmt.hex_bytes(arr))
    bad = trace.tensors["blocks.1.attn.softmax"].copy()
    index = (1, 2, 5, 7)
    bad[index] = 100 if bad[index] != 100 else 99
    (actual / "blocks.1.attn.softmax.hex").write_bytes(dumpfmt.hex_bytes(bad))
    code, text = run_check(out, actual, capsys)
    assert code == 1
    first = text.split("first divergent op:")[1]
    assert "blocks.1.attn.softmax (softmax)" in first.splitlines()[0]
    assert f"index {index}: expected {trace.tensors['blocks.1.attn.softmax'][index]}, actual {bad[index]}" in first
    assert "MISMATCH (1 of" in text
    report = check.compare_dumps(out, actual)
    assert [r.op_name for r in report.results if not r.ok] == ["blocks.1.attn.softmax"]


def test_check_reports_missing_bad_dtype_and_bad_shape_before_values(dump, tmp_path, capsys):
    out, manifest, trace, _ = dump
    actual = tmp_path / "device" / "tensors"
    actual.mkdir(parents=True)
    for name, arr in trace.tensors.items():
        np.save(actual / f"{name}.npy", arr)
    (actual / "blocks.0.mlp.gelu.npy").unlink()
    qkv = trace.tensors["blocks.0.attn.qkv"]
    np.save(actual / "blocks.0.attn.qkv.npy", (qkv.astype(np.int16) + 1))            # wrong dtype AND values
    np.save(actual / "blocks.0.attn.proj.npy", trace.tensors["blocks.0.attn.proj"].reshape(-1) + 1)  # shape
    (actual / "blocks.1.norm1.npy").unlink()
    (actual / "blocks.1.norm1.bin").write_bytes(dumpfmt.bin_bytes(trace.tensors["blocks.1.norm1"])[:-1])
    code, text = run_check(out, tmp_path / "device", capsys)
    assert code == 1
    lines = {line.split("]", 1)[1].split(" (")[0].strip(): line for line in text.splitlines() if line.startswith("[")}
    assert "BAD DTYPE (dtype int16, expected int8)" in lines["blocks.0.attn.qkv"]
    assert "BAD SHAPE" in lines["blocks.0.attn.proj"] and "expected (2, 48, 1, 18)" in lines["blocks.0.attn.proj"]
    assert "MISSING" in lines["blocks.0.mlp.gelu"]
    assert "BAD SHAPE" in lines["blocks.1.norm1"] and "bytes" in lines["blocks.1.norm1"]
    assert "first divergent op: [4] blocks.0.attn.qkv (conv2d)" in text
    assert "BAD DTYPE: dtype int16, expected int8" in text


def test_check_usage_errors_exit_2(dump, tmp_path, capsys):
    assert run_check(tmp_path / "nope", dump[0], capsys)[0] == 2
    assert run_check(dump[0], tmp_path / "nope", capsys)[0] == 2
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "manifest.json").write_text("{not json")
    code, text = run_check(tmp_path / "g", dump[0], capsys)
    assert code == 2 and "cannot read golden manifest" in text


def bump(device, name, index, by):
    a = np.load(device / f"{name}.npy")
    a[index] = a[index] + by
    np.save(device / f"{name}.npy", a)
    return a


def test_check_ops_present_and_the_summary_line(inside, tmp_path, capsys):
    out, m, *_ = inside
    device = tmp_path / "dev"
    copy_tensors(out, device)
    bump(device, "blocks.0.mlp.fc1.acc", (0, 3, 0, 2), 1)             # the MAC array, before requantization
    code, text, _ = run(capsys, "check", out, device)
    assert code == 1
    assert "first divergent op: [14] blocks.0.mlp.fc1 (conv2d), tensor blocks.0.mlp.fc1.acc (internal acc)" in text
    code, text, _ = run(capsys, "check", out, device, "--ops", "blocks.1.*,head")
    assert code == 0
    last = text.splitlines()[-1]
    n_sel = sum(1 + len(op.get("internals", {})) for op in m["ops"]
                if op["name"].startswith("blocks.1.") or op["name"] == "head")
    assert last.startswith(f"summary: {n_sel} OK of {n_sel} tensors compared; not compared: ") and last.endswith("PASS")
    assert f"{len(m['tensors']) - 1 - n_sel} outside --ops" in last             # every tensor but the input
    for f in device.glob("blocks.1.*"):                                       # the device dumped no block 1
        f.unlink()
    code, text, _ = run(capsys, "check", out, device, "--present", "--ops", "blocks.1.*,head")
    assert code == 0
    assert "not compared (not dumped by the device): blocks.1.norm1.sum," in text
    code, text, _ = run(capsys, "check", out, device, "--ops", "blocks.1.norm1")
    assert code == 1 and "MISSING (no blocks.1.norm1.sum.npy/.hex/.bin in" in text
    code, _, err = run(capsys, "check", out, device, "--ops", "nothing.*")
    assert code == 2 and "matches --ops nothing.*" in err
    code, _, err = run(capsys, "check", out, tmp_path / "empty_dir_missing")
    assert code == 2


def test_check_json_atol_and_the_file_read(inside, tmp_path, capsys):
    out, m, *_ = inside
    device = tmp_path / "dev"
    copy_tensors(out, device)
    good = np.load(out / "tensors" / "blocks.0.attn.softmax.npy")
    bump(device, "blocks.0.attn.softmax", (1, 2, 3, 4), 1 if good[1, 2, 3, 4] < 127 else -1)
    code, text, _ = run(capsys, "check", out, device, "--atol", "1")
    assert code == 0
    assert "blocks.0.attn.softmax (softmax): WITHIN 1 LSB (1 of" in text and "summary: " in text.splitlines()[-1]
    assert "WITHIN 1 LSB" in text.splitlines()[-1] and text.splitlines()[-1].endswith("PASS")
    assert "[  0] patch_embed (conv2d) -> patch_embed.acc: OK (patch_embed.acc.npy)" in text
    acc = bump(device, "blocks.1.mlp.fc2.acc", (1, 5, 0, 0), -7)
    code, text, _ = run(capsys, "check", out, device, "--atol", "1", "--json")
    assert code == 1
    rep = json.loads(text)
    rows = {r["tensor"]: r for r in rep["results"]}
    r = rows["blocks.1.mlp.fc2.acc"]
    assert (r["status"], r["differ"], r["max_abs_diff"], r["file"], r["internal"]) == \
        ("MISMATCH", 1, 7, "blocks.1.mlp.fc2.acc.npy", "acc")
    assert r["first"] == {"index": [1, 5, 0, 0], "expected": int(acc[1, 5, 0, 0]) + 7, "actual": int(acc[1, 5, 0, 0])}
    w = rows["blocks.0.attn.softmax"]
    assert (w["status"], w["differ"], w["max_abs_diff"]) == ("WITHIN", 1, 1)
    assert rows["head"]["status"] == "OK" and rows["head"]["max_abs_diff"] == 0 and rows["head"]["first"] is None
    assert rep["first_divergence"]["tensor"] == "blocks.0.attn.softmax" and rep["ok"] is False
    assert rep["counts"] == {"OK": len(rows) - 2, "WITHIN": 1, "MISMATCH": 1}
    assert run(capsys, "check", out, device, "--atol", "-1")[0] == 2


def test_check_format_is_never_replaced_by_another(inside, tmp_path, capsys):
    out, m, *_ = inside
    device = tmp_path / "dev"
    copy_tensors(out, device, fmt="npy")
    copy_tensors(out, device, {"head"}, fmt="hex")
    code, text, _ = run(capsys, "check", out, device, "--format", "hex", "--present")
    assert code == 0 and "[ 35] head (conv2d): OK (head.hex)" in text
    code, text, _ = run(capsys, "check", out, device, "--format", "hex")
    assert code == 1 and "patch_embed (conv2d): MISSING (no patch_embed.hex in" in text
    code, text, _ = run(capsys, "check", out, device)
    assert code == 0 and "head (conv2d): OK (head.npy)" in text


# ---------------------------------------------------------------- a broken golden folder

def _broken(dump, tmp_path, capsys, damage):
    gold = shutil.copytree(dump[0], tmp_path / "gold")
    damage(gold)
    code = main(["check", str(gold), str(gold / "tensors")])
    return code, capsys.readouterr()


def _edit_manifest(gold, edit):
    m = json.loads((gold / "manifest.json").read_text())
    edit(m)
    (gold / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    (lambda g: (g / "tensors" / "blocks.0.norm1.npy").unlink(), "is missing"),
    (lambda g: _edit_manifest(g, lambda m: m.update(ops=[])), "lists no ops"),
    (lambda g: _edit_manifest(g, lambda m: m["tensors"]["embed"]["files"].update(npy="../../etc/passwd")),
     "outside the golden folder"),
    (lambda g: _edit_manifest(g, lambda m: m["input"].update(sha256_int8="0" * 64)), "sha256"),
])
def test_check_refuses_a_broken_golden_folder(dump, tmp_path, capsys, damage, message):
    code, cap = _broken(dump, tmp_path, capsys, damage)
    assert code == 2 and cap.err.startswith("refvit: error: ") and message in cap.err, cap.err
