"""python -m conformance list | run | write  (see --help of each)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from refvit.dumpfmt import check_formats
from refvit.errors import UsageError
from refvit.outfiles import write_folder_atomically

from .cases import SETS, get_case, select
from .casefiles import write_case
from .dut import DUT, KERNEL_SETS, ExternalCommandDUT, RefvitDUT, use_kernels
from .runner import ERROR, FAIL, PASS, junit_xml, run_cases, summarize

INDEX_SCHEMA = "refvit-conformance-index"     # index.json of `write`: marks a folder this command may replace
REFERENCE = "reference"                       # --dut reference: refvit's own kernels (conformance.RefvitDUT)
DUT_HELP = (f"give --dut module:Class (your conformance.DUT subclass), --dut {REFERENCE} (refvit's own kernels) "
            f"or --cmd COMMAND (an external program per case)")




def _load_dut(spec: str) -> DUT:
    """'module:Class' -> an instance (the module is imported from the current folder or sys.path);
    'reference' -> RefvitDUT()."""
    if spec == REFERENCE:
        return RefvitDUT()
    module_name, _, cls_name = spec.partition(":")
    if not module_name or not cls_name:
        raise UsageError(f"--dut must be module:Class or {REFERENCE}, got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:   # not found, or the module's own error while importing
        raise UsageError(f"cannot load DUT {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") \
            from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise UsageError(f"cannot load DUT {spec!r}: module {module_name!r} has no attribute {cls_name!r}")
    try:
        dut = cls()
    except Exception as e:   # the DUT's constructor failed (no device, bad configuration, ...)
        raise UsageError(f"cannot create DUT {spec!r}: {cls_name}() raised {type(e).__name__}: {e}") from None
    if not callable(getattr(dut, "run_case", None)):
        raise UsageError(f"{spec!r} is not a conformance DUT (no run_case method; subclass conformance.DUT)")
    return dut


def _specs(args):
    ops = [o for part in args.ops or () for o in part.split(",") if o] or None
    specs = select(args.set, args.filter, ops=ops, rounding=args.rounding)
    if not specs:
        asked = ", ".join(f"{k} {v!r}" for k, v in (("filter", args.filter), ("ops", ops), ("rounding", args.rounding))
                          if v)
        raise UsageError(f"no case of set {args.set!r} matches {asked or 'the selection'}")
    return specs


def cmd_list(args) -> int:
    lines = [f"{s.name}  ({s.op}{', quick' if s.quick else ''})\n" for s in _specs(args)]
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
    return 0


def cmd_run(args) -> int:
    if not args.dut and not args.cmd:
        raise UsageError(f"which device? {DUT_HELP}")
    if args.dut and args.cmd:
        raise UsageError(f"--dut and --cmd exclude each other; {DUT_HELP}")
    junit = Path(args.junit) if args.junit else None
    if junit and not junit.parent.is_dir():
        raise UsageError(f"--junit {junit}: folder {junit.parent} does not exist")
    use_kernels(args.kernels)
    dut = _load_dut(args.dut) if args.dut else ExternalCommandDUT(args.cmd, timeout=args.timeout, workdir=args.keep,
                                                                  keep=bool(args.keep))
    specs = _specs(args)
    results = run_cases(dut, specs, on_result=lambda r: print(r.line(), flush=True))
    if junit:
        junit.write_text(junit_xml(results, f"conformance.{args.set}"))
    print(summarize(results), flush=True)
    if junit:
        print(f"wrote {junit} (JUnit XML, {len(results)} test cases)", flush=True)
    failed = any(r.status in (FAIL, ERROR) for r in results)
    if not failed and not any(r.status == PASS for r in results):
        print("no case ran: the DUT implements none of the selected cases' methods", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _earlier_write(folder: Path) -> bool:
    """The folder holds an earlier `write` (its index.json lists cases)."""
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and isinstance(index.get("cases"), list)


def cmd_write(args) -> int:
    formats = check_formats(f for f in args.formats.split(",") if f)
    out = Path(args.dir)
    specs = _specs(args)
    t0 = time.perf_counter()

    def write(folder: Path) -> None:
        index = []
        for spec in specs:
            case = get_case(spec.name)
            write_case(case, folder / case.name, formats, with_expected=True)
            index.append({"name": case.name, "op": case.op, "folder": case.name, "quick": spec.quick,
                          "rounding": spec.rounding})
        (folder / "index.json").write_text(json.dumps({"schema": INDEX_SCHEMA, "set": args.set, "filter": args.filter,
                                                       "cases": index}, indent=1))
    write_folder_atomically(out, write, earlier=_earlier_write, what="`conformance write` (an index.json listing cases)")
    print(f"wrote {len(specs)} cases ({','.join(formats)}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance", description="refvit INT8 DeiT conformance suite")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--set", choices=SETS, default="quick", help="case set (quick is a subset of full)")
        sp.add_argument("--filter", metavar="SUBSTR", help="only cases whose name contains SUBSTR")
        sp.add_argument("--ops", action="append", metavar="OP[,OP]",
                        help="only the cases of these ops (DUT method names: conv2d, softmax, block, ...)")
        sp.add_argument("--rounding", metavar="MODE", help="only cases run with this rounding mode (single or "
                        "double, or SINGLE_ROUND / DOUBLE_ROUND), and those whose op takes none")

    sp = sub.add_parser("list", help="list case names")
    common(sp)
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("run", help="run cases against a DUT", description=f"Run cases against a DUT: {DUT_HELP}. "
                        "Cases of methods the DUT does not implement are SKIP (counted and listed in the summary). "
                        "Exit 0: no FAIL or ERROR and at least one PASS; 1 otherwise; 2 usage error.")
    common(sp)
    sp.add_argument("--dut", metavar="module:Class", help=f"a conformance.DUT subclass (instantiated without args), "
                    f"or {REFERENCE!r}: refvit's own kernels (conformance.RefvitDUT)")
    sp.add_argument("--cmd", metavar="COMMAND", help="external program run per case with the case folder path")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds per case for --cmd (default 600)")
    sp.add_argument("--keep", metavar="DIR", help="with --cmd: keep the case folders under DIR")
    sp.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML (one testcase per case)")
    sp.add_argument("--kernels", choices=KERNEL_SETS, default="fast", help="refvit's kernels for the expected "
                    "outputs and --dut reference: fast (default) or reference (refvit.reference, the spec's plain "
                    "pseudocode as code: the same bits, slower)")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("write", help="write cases to disk with expected outputs (golden files)",
                        description="Write cases with expected outputs into DIR, which must be new, empty or an "
                        "earlier write (replaced whole: no stale case folders remain).")
    sp.add_argument("dir", metavar="DIR")
    common(sp)
    sp.add_argument("--formats", default="npy,hex", help="comma-separated subset of npy,hex,bin,h (npy always)")
    sp.set_defaults(func=cmd_write)
    return p


def _quiet_stdout() -> None:
    """The reader of stdout is gone (`list | head`): send what is still buffered nowhere, so that the exit
    flush does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):    # a stream without a file (captured): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:     # `python -m conformance list | head`: the reader has what it wanted
        _quiet_stdout()
        return 0 if args.command == "list" else 1
    except (UsageError, ValueError, OSError) as e:
        print(f"conformance: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
