"""Output paths and pipes: --out replaces only a regular file, atomically; a closed pipe ends quietly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from refvit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _quantize(out, capsys):
    code = main(["quantize", "--calib", str(ROOT / "refvit" / "data" / "examples"), "--out", str(out), "--quiet"])
    return code, capsys.readouterr()


def test_quantize_out_refuses_a_fifo_and_a_folder(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        code, cap = _quantize(target, capsys)
        assert code == 2 and cap.err.startswith("refvit: error: ") and "not a regular file" in cap.err
    assert fifo.is_fifo()                                   # left as it was


def test_quantize_out_replaces_a_file_atomically_and_leaves_no_temporary(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    out.write_text("old")
    code, cap = _quantize(out, capsys)
    assert code == 0, cap.err
    assert out.read_bytes()[:8] != b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    code, cap = _quantize(tmp_path / "no" / "such" / "dir" / "q.safetensors", capsys)
    assert code == 2 and cap.err.startswith("refvit: error: ") and len(cap.err.strip().splitlines()) == 1


def test_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m refvit classify | head -c 10", shell=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout and "Error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- golden folders: atomic, verified by check

def _golden(out, capsys, seed="3"):
    code = main(["golden", "--seed", seed, "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    return code, cap


def test_golden_replaces_an_earlier_dump_whole_and_refuses_other_folders(tmp_path, capsys):
    out = tmp_path / "g"
    assert _golden(out, capsys, "3")[0] == 0
    (out / "tensors" / "stale_from_run_a.npy").write_bytes(b"x")
    assert _golden(out, capsys, "4")[0] == 0
    assert not (out / "tensors" / "stale_from_run_a.npy").exists()            # no mixing of two runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]                # no temporary left behind
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, cap = _golden(mine, capsys)
    assert code == 2 and "refusing to replace" in cap.err and (mine / "notes.txt").read_text() == "keep me"


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(capsys):
    from refvit.cli import progress_bar, progress_printer
    assert progress_bar(3, 12, 8) == "[##......] " and progress_bar(12, 12, 4) == "[####] " and progress_bar(5, None) == ""
    show = progress_printer("calibrating")
    show(1, 4)
    show(4, 4)
    assert capsys.readouterr().err == "calibrating: batch 1/4\ncalibrating: batch 4/4\n"   # stderr is no terminal here
    assert progress_printer("x", quiet=True) is None
