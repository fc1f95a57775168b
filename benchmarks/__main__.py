"""python -m benchmarks SUITE [--quick | --full] [--no-write] [--plots-dir DIR] ...

Suites are the modules benchmarks/bench_<suite>.py; each compares our ops with their
peers in this one process (interleaved rounds, best of each), prints a header and one
table line per finished case under a progress bar, then its section with plots.
`all` runs every suite. Sizes: the default is a representative subset of each suite
(`all`: ~10-15 minutes on 2 cores); --full the sizes of benchmarks/RESULTS.md (hours),
--quick a smoke run. A --full run rewrites its section of benchmarks/RESULTS.md and
benchmarks/plots/; the others write benchmarks/out/ (RESULTS.md, plots/).
"""

import argparse
import importlib
import pkgutil
import sys
import time
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
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, one pass (a smoke run, not for RESULTS.md)")
    size.add_argument("--full", action="store_true", help="the sizes of benchmarks/RESULTS.md (hours on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-write", action="store_true", help="print only: no RESULTS.md, no plots (unless --plots-dir)")
    p.add_argument("--plots-dir", default=None, help="write the plots here (default: next to the results written)")
    args, rest = p.parse_known_args(argv)
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    from . import _util as U

    took = {}
    for name in names if args.suite == "all" else [args.suite]:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        U.run_header(name, mod.__doc__, list(getattr(mod, "CONTENDERS", ())), args)
        t0, c0 = time.perf_counter(), time.process_time()
        mod.main(args, rest)
        took[name] = time.perf_counter() - t0
        # CPU time too: on a shared machine the wall time says more about the other jobs
        U.say(f"{name}: {took[name] / 60:.1f} minutes ({(time.process_time() - c0) / 60:.1f} CPU minutes)")
    if len(took) > 1:
        U.say("all: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in took.items())
              + f" minutes; {sum(took.values()) / 60:.1f} in all")


if __name__ == "__main__":
    main()
