"""The device-under-test interface of the conformance suite.

A DUT has one method per integer op variant of refvit's op registry (`refvit.registry`), named after and
with the same signature and semantics as refvit's kernel of that name (docs/spec.md Parts 2 and 4, "Token
pruning"; e.g. `conv2d`, `gelu_poly`, `select_tokens`), plus the arithmetic primitives
`apply_scale` and `requantize` (Part 1). `block` and
`model` run the case's integer graph (refvit.graph: the op records of refvit's own model) with the DUT's
per-op methods, so a team that implements only the kernels gets whole blocks and models tested too;
override them to test a fused implementation. `run_case` is the single entry point of the runner; ExternalCommandDUT overrides
it to hand each case to an external program (an RTL simulator wrapper, a C model).
"""
from __future__ import annotations

import inspect
import os
import shlex
import signal
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from refvit import intmath, registry
from refvit.reference import arith as reference_arith
from refvit.graph import graph_from_dicts, run_graph
from refvit.intmath import SINGLE_ROUND

from .casefiles import read_output, write_case


class DUTError(RuntimeError):
    """The device under test failed to run a case (crashed, timed out, wrote no output)."""


def _not_implemented(name: str, row=None, signature=None):
    """A DUT method stub: raises NotImplementedError; `not_implemented` marks it for the runner (SKIP)."""
    def method(self, *args, **kwargs):
        raise NotImplementedError(name)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = (f"{row.summary} ({row.op}/{row.variant}; docs/spec.md, {row.spec})" if row else None)
    if signature is not None:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        method.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    method.not_implemented = True
    return method


class DUT:
    """Base class: implement the ops your device supports, one method per kernel name.

    The per-op methods are generated from refvit's op registry (`refvit.registry`: one row per (op,
    variant), `python -m conformance methods` lists them with their signatures): each has the signature of
    refvit's kernel of that name and raises NotImplementedError until a subclass defines it (the runner then
    SKIPs its cases). `apply_scale` and `requantize` (docs/spec.md Part 1) are the arithmetic primitives."""

    # -- arithmetic primitives (docs/spec.md, Part 1) ------------------------------------
    def apply_scale(self, value, multiplier, shift, rounding=SINGLE_ROUND):
        """round(value * multiplier * 2^-shift) -> int64, not saturated."""
        raise NotImplementedError("apply_scale")

    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        """saturate(apply_scale(value, multiplier, shift, rounding), out_dtype)."""
        raise NotImplementedError("requantize")

    apply_scale.not_implemented = requantize.not_implemented = True

    def __getattr__(self, name):
        """A kernel of a registry row added after this class was made (a team's own variant): a stub."""
        try:
            row = registry.by_kernel_name(name)
        except registry.UnknownOpError:
            raise AttributeError(name) from None
        return _not_implemented(name, row, inspect.signature(row.kernel)).__get__(self)

    # -- composites: the case's graph, run with this DUT's per-op methods ------------------------
    def kernel_for(self, op):
        """The method that computes an op record: the DUT's method named after refvit's kernel; pure data
        movement (split_heads, gather_prefix) falls back to refvit's own unless the DUT defines it."""
        row = registry.row(op.op, op.variant)
        method = getattr(self, row.kernel_name)
        if getattr(method, "not_implemented", False) and row.data_movement:
            return row.kernel
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


PRIMITIVES = {"fast": {"apply_scale": intmath.apply_scale, "requantize": intmath.requantize},
              "reference": {"apply_scale": reference_arith.apply_scale, "requantize": reference_arith.requantize}}
KERNEL_SETS = tuple(PRIMITIVES)
_KERNEL_SET = ["fast"]


def use_kernels(name: str) -> None:
    """Which of refvit's kernels give the cases' expected outputs and RefvitDUT's methods: 'fast' (default)
    or 'reference' (refvit.reference, the spec's plain pseudocode as code; the same bits, slower)."""
    if name not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {name!r}; choose from {', '.join(KERNEL_SETS)}")
    _KERNEL_SET[0] = name


def kernel_set() -> str:
    return _KERNEL_SET[0]


def _kernels(data_movement: bool = False) -> dict:
    """Method name -> refvit's function of the kernel set in use: the primitives, then every registry row's
    kernel (pure data movement only when asked: a DUT may define it, and falls back to refvit's when it does
    not)."""
    ref = _KERNEL_SET[0] == "reference"
    return PRIMITIVES[_KERNEL_SET[0]] | {r.kernel_name: r.reference if ref else r.kernel for r in registry.rows()
                                         if data_movement or not r.data_movement}


for _row in registry.rows():   # the per-op stubs, one per registry row, with the kernel's signature
    if _row.kernel_name not in DUT.__dict__:
        setattr(DUT, _row.kernel_name, _not_implemented(_row.kernel_name, _row, inspect.signature(_row.kernel)))


class _ReferenceKernels(dict):
    """The reference implementation of every per-op method (cases take their expected outputs from it),
    read from the registry when asked, so rows registered later are in it."""

    def _all(self):
        return _kernels()

    def __getitem__(self, name):
        return self._all()[name]

    def __contains__(self, name):
        return name in self._all()

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())

    def items(self):
        return self._all().items()

    def keys(self):
        return self._all().keys()


REFERENCE_KERNELS = _ReferenceKernels()
OPS = tuple(_kernels()) + ("block", "model")


class _RefvitKernel:
    """A RefvitDUT method: refvit's function of that name in the kernel set in use (`use_kernels`)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, cls=None):
        return _kernels(data_movement=True)[self.name]


class RefvitDUT(DUT):
    """refvit itself: every per-op method is refvit's kernel (fast, or reference after
    `use_kernels('reference')`); block and model are DUT's compositions."""

    def __getattr__(self, name):
        try:
            return _kernels(data_movement=True)[name]
        except KeyError:
            raise AttributeError(name) from None


for _name in _kernels(data_movement=True):   # same signatures by construction
    setattr(RefvitDUT, _name, _RefvitKernel(_name))


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
