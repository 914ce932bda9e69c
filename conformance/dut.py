"""The device-under-test interface of the conformance suite.

A DUT has one method per integer op of the spec, with the same signature and semantics as refvit's
function of that name (refvit.intmath / refvit.int_kernels, docs/spec-part1-arith.md and
docs/spec-part2-kernels.md). `block` and `model` are composed from the DUT's own per-op methods, so a
team that implements only the kernels gets whole blocks and models tested too; override them to test a
fused implementation. `run_case` is the single entry point of the runner; ExternalCommandDUT overrides
it to hand each case to an external program (an RTL simulator wrapper, a C model).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from refvit import int_kernels as K
from refvit import intmath
from refvit.config import DeiTConfig
from refvit.int_model import gather_prefix
from refvit.intmath import SINGLE_ROUND


class DUTError(RuntimeError):
    """The device under test failed to run a case (crashed, timed out, wrote no output)."""


class DUT:
    """Base class: implement the ops your device supports; unimplemented ones make their cases ERROR."""

    # -- arithmetic primitives (docs/spec-part1-arith.md) ------------------------------------
    def apply_scale(self, value, multiplier, shift, rounding=SINGLE_ROUND):
        """round(value * multiplier * 2^-shift) -> int64, not saturated."""
        raise NotImplementedError("apply_scale")

    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        """saturate(apply_scale(value, multiplier, shift, rounding), out_dtype)."""
        raise NotImplementedError("requantize")

    # -- kernels (docs/spec-part2-kernels.md) ------------------------------------------------
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

    # -- composites --------------------------------------------------------------------------
    def block(self, x, constants, *, num_heads, rounding=SINGLE_ROUND):
        """One transformer block on int8 tokens (B, C, 1, N) -> int8 (B, C, 1, N).

        constants: the block's integer constants named relative to the block ('norm1.weight',
        'attn.qkv.multiplier', 'attn.softmax.shift', 'mlp.gelu.table', 'residual2.multiplier_a', ...)
        plus the shared 'exp_table' -- `block_constants(model_constants, i)` makes this dict."""
        c, C = constants, x.shape[1]
        h = _layernorm(self, c, "norm1", x, rounding)
        qkv = _conv(self, c, "attn.qkv", h, rounding)                               # (B, 3C, 1, N): q | k | v
        q, k, v = (K.split_heads(np.ascontiguousarray(qkv[:, j * C:(j + 1) * C]), num_heads) for j in range(3))
        p = self.softmax(self.attention_scores(q, k), c["attn.softmax.multiplier"], c["attn.softmax.shift"],
                         c["exp_table"], rounding=rounding)
        o = K.merge_heads(self.attention_context(p, v, c["attn.context.multiplier"], c["attn.context.shift"],
                                                 rounding=rounding))
        x = _add(self, c, "residual1", x, _conv(self, c, "attn.proj", o, rounding))
        h = _conv(self, c, "mlp.fc1", _layernorm(self, c, "norm2", x, rounding), rounding)
        h = _conv(self, c, "mlp.fc2", self.gelu(h, c["mlp.gelu.table"]), rounding)
        return _add(self, c, "residual2", x, h)

    def model(self, x, constants, *, config, rounding=SINGLE_ROUND):
        """The whole integer DeiT: int8 image (B, 3, H, W) -> int16 logits (B, K).

        constants: the integer constants of a QuantizedModel, by their full names (qm.tensors without
        the float scales); config: DeiTConfig.to_dict()."""
        cfg, c = DeiTConfig.from_dict(config), constants
        t = _conv(self, c, "patch_embed", x, rounding)                               # (B, C, g, g)
        t = self.concat_tokens(c["prefix_tokens"], t.reshape(t.shape[0], cfg.embed_dim, 1, cfg.num_patches))
        t = _add(self, c, "embed", t, c["pos_embed"])
        for i in range(cfg.depth):
            t = self.block(t, block_constants(c, i), num_heads=cfg.num_heads, rounding=rounding)
        t = _layernorm(self, c, "norm", t, rounding)
        return _conv(self, c, "head", gather_prefix(t, cfg.num_prefix_tokens), rounding, np.int16)[:, :, 0, 0]

    # -- the runner's entry point -------------------------------------------------------------
    def run_case(self, case):
        """The DUT's output for one conformance case (an ndarray)."""
        return getattr(self, case.op)(*case.inputs.values(), **case.params)


def block_constants(model_constants: dict, index: int) -> dict:
    """The constants of block `index`, named relative to it, plus the shared softmax exp_table."""
    prefix = f"blocks.{index}."
    out = {k[len(prefix):]: v for k, v in model_constants.items() if k.startswith(prefix)}
    return out | {"exp_table": model_constants["exp_table"]}


def _conv(dut, c, name, x, rounding, out_dtype=np.int8):
    return dut.conv2d(x, c[f"{name}.weight"], c[f"{name}.bias"], c[f"{name}.multiplier"], c[f"{name}.shift"],
                      rounding=rounding, out_dtype=out_dtype)


def _layernorm(dut, c, name, x, rounding):
    return dut.layernorm(x, c[f"{name}.eps_int"], c[f"{name}.weight"], c[f"{name}.bias"], c[f"{name}.multiplier"],
                         c[f"{name}.shift"], rounding=rounding)


def _add(dut, c, name, a, b):
    return dut.add(a, b, c[f"{name}.multiplier_a"], c[f"{name}.multiplier_b"], c[f"{name}.shift"])


# The reference implementation of every per-op method: cases take their expected outputs from it.
REFERENCE_KERNELS = {
    "apply_scale": intmath.apply_scale, "requantize": intmath.requantize, "conv2d": K.conv2d,
    "attention_scores": K.attention_scores, "softmax": K.softmax, "attention_context": K.attention_context,
    "add": K.add, "layernorm": K.layernorm, "gelu": K.gelu, "concat_tokens": K.concat_tokens,
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
        self.cmd, self.timeout, self.keep, self.formats = cmd, timeout, keep, tuple(formats)
        self.workdir = Path(workdir) if workdir else None

    def _argv(self, folder: Path) -> list:
        argv = shlex.split(self.cmd)
        if any("{dir}" in a for a in argv):
            return [a.replace("{dir}", str(folder)) for a in argv]
        return argv + [str(folder)]

    def run_case(self, case):
        from .casefiles import read_output, write_case
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{case.name}_", dir=self.workdir))
        try:
            meta = write_case(case, folder, self.formats, with_expected=False)
            try:
                proc = subprocess.run(self._argv(folder), capture_output=True, text=True, timeout=self.timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise DUTError(f"command {self.cmd!r} failed to run: {e}") from None
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip()[-500:]
                raise DUTError(f"command exited with status {proc.returncode}: {tail}")
            return read_output(folder, meta["output"])
        finally:
            if not self.keep:
                shutil.rmtree(folder, ignore_errors=True)
