"""python -m conformance list | run | write  (see --help of each)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from refvit.dumpfmt import check_formats

from .cases import SETS, get_case, select
from .casefiles import write_case
from .dut import DUT, ExternalCommandDUT
from .runner import PASS, run_cases, summarize


class UsageError(ValueError):
    pass


def _load_dut(spec: str) -> DUT:
    """'module:Class' -> an instance (the module is imported from the current folder or sys.path)."""
    module_name, _, cls_name = spec.partition(":")
    if not module_name or not cls_name:
        raise UsageError(f"--dut must be module:Class, got {spec!r}")
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
    specs = select(args.set, args.filter)
    if not specs:
        raise UsageError(f"no case of set {args.set!r} matches filter {args.filter!r}")
    return specs


def cmd_list(args) -> int:
    for s in _specs(args):
        print(f"{s.name}  ({s.op}{', quick' if s.quick else ''})")
    return 0


def cmd_run(args) -> int:
    if bool(args.dut) == bool(args.cmd):
        raise UsageError("give exactly one of --dut module:Class or --cmd COMMAND")
    dut = _load_dut(args.dut) if args.dut else ExternalCommandDUT(args.cmd, timeout=args.timeout, workdir=args.keep,
                                                                  keep=bool(args.keep))
    specs = _specs(args)
    results = run_cases(dut, specs, on_result=lambda r: print(r.line(), flush=True))
    print(summarize(results))
    return 0 if all(r.status == PASS for r in results) else 1


def cmd_write(args) -> int:
    formats = check_formats(f for f in args.formats.split(",") if f)
    out = Path(args.dir)
    index = []
    t0 = time.perf_counter()
    for spec in _specs(args):
        case = get_case(spec.name)
        write_case(case, out / case.name, formats, with_expected=True)
        index.append({"name": case.name, "op": case.op, "folder": case.name, "quick": spec.quick})
    (out / "index.json").write_text(json.dumps({"set": args.set, "filter": args.filter, "cases": index}, indent=1))
    print(f"wrote {len(index)} cases ({','.join(formats)}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance", description="refvit INT8 DeiT conformance suite")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--set", choices=SETS, default="quick", help="case set (quick is a subset of full)")
        sp.add_argument("--filter", metavar="SUBSTR", help="only cases whose name contains SUBSTR")

    sp = sub.add_parser("list", help="list case names")
    common(sp)
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("run", help="run cases against a DUT")
    common(sp)
    sp.add_argument("--dut", metavar="module:Class", help="a conformance.DUT subclass (instantiated without args)")
    sp.add_argument("--cmd", metavar="COMMAND", help="external program run per case with the case folder path")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds per case for --cmd (default 600)")
    sp.add_argument("--keep", metavar="DIR", help="with --cmd: keep the case folders under DIR")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("write", help="write cases to disk with expected outputs (golden files)")
    sp.add_argument("dir", metavar="DIR")
    common(sp)
    sp.add_argument("--formats", default="npy,hex", help="comma-separated subset of npy,hex,bin,h (npy always)")
    sp.set_defaults(func=cmd_write)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, OSError) as e:
        print(f"conformance: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
