"""The device-under-test interface of the conformance suite.

A DUT has one method per integer op of the spec, with the same signature and semantics as refvit's
function of that name (refvit.intmath / refvit.int_kernels, docs/spec.md Parts 1 and 2; the scheme variants'
kernels of refvit.int_kernels_variants, Part 4, e.g. `gelu_poly`, `layernorm_int32`). `block` and
`model` run the case's integer graph (refvit.graph: the op records of refvit's own model) with the DUT's
per-op methods, so a team that implements only the kernels gets whole blocks and models tested too;
override them to test a fused implementation. `run_case` is the single entry point of the runner; ExternalCommandDUT overrides
it to hand each case to an external program (an RTL simulator wrapper, a C model).
"""
from __future__ import annotations

import os
import shlex
import signal
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from refvit import int_kernels as K
from refvit import int_kernels_prune as KP
from refvit import int_kernels_variants as KV
from refvit import intmath
from refvit.graph import DATA_MOVEMENT, KERNELS, graph_from_dicts, run_graph
from refvit.intmath import SINGLE_ROUND

from .casefiles import read_output, write_case


class DUTError(RuntimeError):
    """The device under test failed to run a case (crashed, timed out, wrote no output)."""


class DUT:
    """Base class: implement the ops your device supports; unimplemented ones make their cases ERROR."""

    # -- arithmetic primitives (docs/spec.md, Part 1) ------------------------------------
    def apply_scale(self, value, multiplier, shift, rounding=SINGLE_ROUND):
        """round(value * multiplier * 2^-shift) -> int64, not saturated."""
        raise NotImplementedError("apply_scale")

    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        """saturate(apply_scale(value, multiplier, shift, rounding), out_dtype)."""
        raise NotImplementedError("requantize")

    # -- kernels (docs/spec.md, Part 2) ------------------------------------------------
    def conv2d(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        """int8 (B, Cin, H, W), stride = kernel k -> out_dtype (B, Cout, H/k, W/k); per-channel requantize."""
        raise NotImplementedError("conv2d")

    def attention_scores(self, q, k):
        """int8 (B, Hh, D, N) x2 -> int32 (B, Hh, N, N)."""
        raise NotImplementedError("attention_scores")

    def softmax(self, scores, multiplier, shift, exp_table, *, rounding=SINGLE_ROUND):
        """int32 (..., N) -> int8 probabilities at scale 1/127 over the last axis."""
        raise NotImplementedError("softmax")

    def attention_context(self, p, v, multiplier, shift, *, rounding=SINGLE_ROUND):
        """int8 p (B, Hh, N, N), v (B, Hh, D, N) -> int8 (B, Hh, D, N)."""
        raise NotImplementedError("attention_context")

    def add(self, a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int8):
        """saturate(rounding_shift_right(a*multiplier_a + b*multiplier_b, shift)); b broadcasts to a."""
        raise NotImplementedError("add")

    def layernorm(self, x, eps_int, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
        """Integer LayerNorm over channels of int8 (B, C, H, W) -> int8."""
        raise NotImplementedError("layernorm")

    def gelu(self, x, table):
        """table[x + 128], int8."""
        raise NotImplementedError("gelu")

    def concat_tokens(self, prefix, patches):
        """int8 prefix (1, C, 1, P) broadcast over B, patches (B, C, 1, Np) -> (B, C, 1, P + Np)."""
        raise NotImplementedError("concat_tokens")

    # -- token pruning (docs/spec.md, "Token pruning (HeatViT / EViT selector)") ------------------
    def select_tokens(self, p, *, keep, num_prefix):
        """int8 p (B, Hh, N, N) -> int32 (B, keep): positions of the patch tokens with the largest sum over heads
        of p[:, h, 0, j] (ties: lower position first), ascending."""
        raise NotImplementedError("select_tokens")

    def prune_tokens(self, x, p, index, *, num_prefix, rounding=SINGLE_ROUND):
        """x (B, C, 1, N), p, index (B, k) -> (B, C, 1, P + k + 1): prefix, kept tokens, the score-weighted
        average of the dropped ones (exact quotient, ties by the rounding mode); x itself when k = N - P."""
        raise NotImplementedError("prune_tokens")

    # -- scheme variants (docs/spec.md, Part 4: refvit/int_kernels_variants.py) --------------------
    def gelu_poly(self, x, c_b, c_c, c_1, erf_shift, multiplier, shift, *, rounding=SINGLE_ROUND):
        """I-BERT i-GELU (HeatViT delta folded into c_1 and the rescale): int8 x, any shape -> int8."""
        raise NotImplementedError("gelu_poly")

    def gelu_shift(self, x, multiplier_in, shift_in, multiplier, shift, *, rounding=SINGLE_ROUND):
        """I-ViT ShiftGELU x * sigmoid(1.702 x) with exp through shifts: int8 x, any shape -> int8."""
        raise NotImplementedError("gelu_shift")

    def softmax_poly(self, scores, multiplier, shift, *, rounding=SINGLE_ROUND):
        """Softmax with I-BERT's i-exp at 2^-14: int32 (..., N) -> int8 probabilities at 1/127."""
        raise NotImplementedError("softmax_poly")

    def softmax_shift(self, scores, multiplier, shift, *, rounding=SINGLE_ROUND):
        """Softmax with I-ViT's ShiftExp (Shiftmax) at 2^-14: int32 (..., N) -> int8 probabilities at 1/127."""
        raise NotImplementedError("softmax_shift")

    def layernorm_int32(self, x, eps_int, eps_shift, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
        """LayerNorm with every intermediate in 32 bits: int8 or int16 (B, C, H, W) -> int8."""
        raise NotImplementedError("layernorm_int32")

    def layernorm_wide(self, x, eps_int, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
        """Part 2's layernorm on int8 or int16 (B, C, H, W) -> int8."""
        raise NotImplementedError("layernorm_wide")

    def add_wide(self, a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int16):
        """Part 2's add on int8 or int16 operands, out_dtype int16 or int8; b broadcasts to a."""
        raise NotImplementedError("add_wide")

    def conv2d_w4(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        """conv2d with 4-bit weight codes in [-7, 7] (stored as int8), one requantization per channel."""
        raise NotImplementedError("conv2d_w4")

    def conv2d_mixed_pot(self, x, weight, bias, multiplier, shift, pot_rows, *, rounding=SINGLE_ROUND,
                         out_dtype=np.int8):
        """conv2d whose rows flagged in pot_rows (bool (Cout,)) hold only 0, +-2^k (k <= 6), the rest int8."""
        raise NotImplementedError("conv2d_mixed_pot")

    # -- composites: the case's graph, run with this DUT's per-op methods ------------------------
    def kernel_for(self, op):
        """The method that computes an op record: the DUT's method named after refvit's kernel; pure data
        movement (split_heads, gather_prefix) falls back to refvit's own unless the DUT defines it."""
        method = getattr(self, op.kernel, None)
        if method is None and op.op in DATA_MOVEMENT:
            return KERNELS[(op.op, op.variant)]
        if method is None:
            raise NotImplementedError(op.kernel)
        return method

    def block(self, x, constants, *, graph):
        """One transformer block on int8 tokens (B, C, 1, N) -> int8 (B, C, 1, N).

        graph: the block's op records (refvit.graph.block_graph, as dicts), in names relative to the block;
        constants: its integer constants by those names ('norm1.weight', 'attn.softmax.shift', 'exp_table')."""
        return run_graph(graph_from_dicts(graph), constants, x, kernels=self.kernel_for)

    def model(self, x, constants, *, graph):
        """The whole integer DeiT: int8 image (B, 3, H, W) -> int16 logits (B, K).

        graph: the model's op records (QuantizedModel.graph, as dicts); constants: its integer constants."""
        logits = run_graph(graph_from_dicts(graph), constants, x, kernels=self.kernel_for)   # (B, K, 1, 1)
        return logits.reshape(logits.shape[0], -1)

    # -- the runner's entry point -------------------------------------------------------------
    def run_case(self, case):
        """The DUT's output for one conformance case (an ndarray)."""
        return getattr(self, case.op)(*case.inputs.values(), **case.params)


# The reference implementation of every per-op method: cases take their expected outputs from it.
REFERENCE_KERNELS = {
    "apply_scale": intmath.apply_scale, "requantize": intmath.requantize, "conv2d": K.conv2d,
    "attention_scores": K.attention_scores, "softmax": K.softmax, "attention_context": K.attention_context,
    "add": K.add, "layernorm": K.layernorm, "gelu": K.gelu, "concat_tokens": K.concat_tokens,
    "select_tokens": KP.select_tokens, "prune_tokens": KP.prune_tokens,
    "gelu_poly": KV.gelu_poly, "gelu_shift": KV.gelu_shift, "softmax_poly": KV.softmax_poly,
    "softmax_shift": KV.softmax_shift, "layernorm_int32": KV.layernorm_int32, "layernorm_wide": KV.layernorm_wide,
    "add_wide": KV.add_wide, "conv2d_w4": KV.conv2d_w4, "conv2d_mixed_pot": KV.conv2d_mixed_pot,
}
OPS = tuple(REFERENCE_KERNELS) + ("block", "model")


class RefvitDUT(DUT):
    """refvit itself: every per-op method delegates to refvit; block and model are DUT's compositions."""


for _op, _fn in REFERENCE_KERNELS.items():   # same signatures by construction
    setattr(RefvitDUT, _op, staticmethod(_fn))


class ExternalCommandDUT(DUT):
    """Runs an external program per case: writes the case folder (case.json + inputs as npy and hex),
    runs `cmd` with the folder path (appended, or substituted for a `{dir}` token), then reads the
    output the program wrote there (out.npy or out.hex, as named in case.json)."""

    def __init__(self, cmd: str, *, timeout: float = 600.0, workdir=None, keep: bool = False,
                 formats=("npy", "hex")):
        if not cmd or not cmd.strip():
            raise ValueError("ExternalCommandDUT: empty command")
        if not timeout > 0:
            raise ValueError(f"ExternalCommandDUT: timeout must be > 0 seconds, got {timeout!r}")
        self.cmd, self.timeout, self.keep, self.formats = cmd, timeout, keep, tuple(formats)
        self.workdir = Path(workdir) if workdir else None

    def _argv(self, folder: Path) -> list:
        argv = shlex.split(self.cmd)
        if any("{dir}" in a for a in argv):
            return [a.replace("{dir}", str(folder)) for a in argv]
        return argv + [str(folder)]

    def _run(self, argv: list) -> tuple:
        """(returncode, stdout, stderr). The command runs in a session (process group) of its own; on timeout
        the whole group is killed (a simulator wrapper's children too), then DUTError."""
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace", start_new_session=True)
        except OSError as e:
            raise DUTError(f"command {self.cmd!r} failed to run: {e}") from None
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except BaseException as e:        # the timeout, or an interrupt of the runner: leave nothing running
            try:
                if hasattr(os, "killpg"):
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
            if isinstance(e, subprocess.TimeoutExpired):
                raise DUTError(f"command {self.cmd!r} timed out after {self.timeout:g} s; killed it and its "
                               f"process group") from None
            raise
        return proc.returncode, out, err

    def run_case(self, case):
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{case.name}_", dir=self.workdir))
        try:
            meta = write_case(case, folder, self.formats, with_expected=False)
            returncode, out, err = self._run(self._argv(folder))
            if returncode != 0:
                tail = (err or out).strip()[-500:]
                raise DUTError(f"command exited with status {returncode}: {tail}")
            return read_output(folder, meta["output"])
        finally:
            if not self.keep:
                shutil.rmtree(folder, ignore_errors=True)
