"""python -m benchmarks SUITE [--quick] ...

Suites are the modules benchmarks/bench_<suite>.py; each compares our ops with their
peers in this one process (interleaved rounds, best of each) and rewrites its section
of benchmarks/RESULTS.md. `all` runs every suite.
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def suites():
    here = Path(__file__).resolve().parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = suites()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=names + ["all"])
    p.add_argument("--quick", action="store_true", help="small sizes, one pass (a smoke run, not for RESULTS.md)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args, rest = p.parse_known_args(argv)
    for name in names if args.suite == "all" else [args.suite]:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        mod.main(args, rest)


if __name__ == "__main__":
    main()
