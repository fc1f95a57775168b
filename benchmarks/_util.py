"""Shared benchmark helpers: interleaved timing, peak memory, sizes by mode, what a run prints
(benchmarks/_console.py), its plots (benchmarks/_plots.py), RESULTS.md sections."""

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import _console
from ._console import progress, say  # noqa: F401  (the suites' progress bar and lines)
from ._memory import Peak, policy_line, timed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"  # what `--full` runs write, with their plots in plots/
OUT = HERE / "out"  # what default and --quick runs write (git-ignored): RESULTS.md, plots/
MODES = ("quick", "default", "full")


def mode(args):
    """'quick', 'default' or 'full': the sizes a run uses (python -m benchmarks --quick / --full)."""
    if getattr(args, "quick", False):
        return "quick"
    return getattr(args, "mode", None) or "default"


def sized(args, sizes):
    """A suite's sizes for this run: `sizes` maps each of MODES to what the suite reads
    (a list of N, a dict of knobs...); a mode a suite does not declare falls back to 'full'."""
    return sizes.get(mode(args), sizes["full"])


def results_path(args):
    return RESULTS if mode(args) == "full" else OUT / "RESULTS.md"


def plots_dir(args):
    """Where this run's plots go: --plots-dir, else next to the results it writes; None with
    --no-write."""
    given = getattr(args, "plots_dir", None)
    if given:
        return Path(given)
    return None if getattr(args, "no_write", False) else results_path(args).parent / "plots"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reason(e, width=100):
    """A failed contender's reason, one line: the exception's type and its first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:width]}"


def add_peer(fwd, errors, name, build):
    """fwd[name] = build(), or errors[name] = why building it failed (a peer that cannot be
    built, e.g. a FlexAttention that does not compile, is a result, not a crash)."""
    try:
        fwd[name] = build()
    except Exception as e:  # noqa: BLE001
        errors[name] = reason(e)


def interleaved(fns, *, rounds=5, device="cpu", min_time=0.0):
    """Best-of-`rounds` seconds of each callable in `fns` (dict name -> fn), measured in
    interleaved rounds so that machine drift hits every contender alike. A contender
    that raises is reported as None with its error in `errors`."""
    return timed(lambda: _interleaved(fns, rounds, device, min_time))


def _interleaved(fns, rounds, device, min_time):
    best = {k: float("inf") for k in fns}
    errors = {}
    for name, fn in fns.items():  # warm-up (compilation, packing caches, allocator)
        try:
            fn()
            sync(device)
        except Exception as e:  # noqa: BLE001 - a failing peer is a result, not a crash
            errors[name] = reason(e, 120)
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            reps, t0 = 0, time.perf_counter()
            while True:
                fn()
                sync(device)
                reps += 1
                el = time.perf_counter() - t0
                if el >= min_time:
                    break
            best[name] = min(best[name], el / reps)
    return {k: (None if k in errors else v) for k, v in best.items()}, errors


def fwd_and_fwd_bwd(fwd, inputs, grad, *, rounds, fwd_only=(), min_time=0.0):
    """Times each forward of `fwd` (name -> fn() -> out) without autograd, then forward +
    backward (gradients of `inputs` for upstream `grad`) of those not in `fwd_only`, and
    the peak memory of the latter. `min_time`: see interleaved (calls of a few ms need
    repeats to rise above timer noise). Returns (t_fwd, t_fwd_bwd, mem_mb, errors)."""
    both = {name: (lambda f=f: torch.autograd.grad(f(), inputs, grad)) for name, f in fwd.items()
            if name not in fwd_only}
    with torch.no_grad():
        t_f, errors = interleaved(fwd, rounds=rounds, min_time=min_time)
    t_b, e = interleaved(both, rounds=rounds, min_time=min_time)
    errors.update(e)
    mem = {name: peak_memory_mb(f) for name, f in both.items() if t_b.get(name)}
    return t_f, t_b, mem, errors


def ratio(times, peer, base="ours"):
    """times[peer] / times[base] (> 1: base faster), None where either did not run."""
    return times[peer] / times[base] if times.get(peer) and times.get(base) else None


def speed_columns(t_f, t_b, peers=(), fwd_only=(), ratios=None, fwd_flops=None):
    """The timing columns of a suite's row: 'fwd ours ms', 'fwd <peer>/ours' for every peer
    (fwd_only: peers without a backward), the same for 'f+b', then any named ratios
    ({label: (name, over)}: times[name] / times[over]) and the forward's GFLOP/s."""
    row = {}
    for tag, t, names in (("fwd", t_f, tuple(peers) + tuple(fwd_only)), ("f+b", t_b, tuple(peers))):
        row[f"{tag} ours ms"] = t["ours"] * 1e3
        row.update({f"{tag} {p}/ours": ratio(t, p) for p in names})
        row.update({f"{tag} {label}": ratio(t, a, b) for label, (a, b) in (ratios or {}).items()})
        if fwd_flops and tag == "fwd":
            row["fwd GFLOP/s"] = fwd_flops / t["ours"] / 1e9
    return row


def memory_columns(mem, names):
    """'mem <name> MiB' for each contender (None where it was not measured)."""
    return {f"mem {n} MiB": mem.get(n) for n in names}


def print_row(row, errors=None):
    """One finished row of a suite's table, as it is measured: an aligned line (ratios
    coloured on a terminal), then one line per contender in `errors` with its reason."""
    _console.row_line(row, _fmt)
    _console.failures(errors)


def publish(args, name, body, rows=None, roofs=None):
    """Prints a suite's section, writes its plots (from `rows`, see benchmarks/_plots.py;
    roofs: {dtype: GEMM GFLOP/s}, else measured here) and links them, and writes the section
    to RESULTS.md (`--full`) or benchmarks/out/RESULTS.md; --no-write writes nothing (plots
    only where --plots-dir is given)."""
    target = results_path(args)
    where = plots_dir(args)
    if rows and where is not None:
        from ._plots import plot_suite

        written = plot_suite(name, rows, where, f"{cpu_model()}, CPU path {_isa()}, commit {commit_hash()}",
                             roofs=roofs or (lambda dt: gemm_gflops(getattr(torch, dt, torch.float32))))
        if written:
            body = body.rstrip() + "\n\nPlots: " + " · ".join(
                f"[{what}]({os.path.relpath(path, target.parent)})" for what, path in written.items()) + "\n"
    say(body)
    if not getattr(args, "no_write", False):
        write_section(name, body, target)
        say(f"(section `{name}` written to {os.path.relpath(target)})")


def report(args, name, title, notes, rows, columns=None, roofs=None):
    """A suite's section (title, command, machine, notes, the table of rows, its plots),
    printed and published."""
    body = header(title, command_line()) + "\n" + notes + "\n\n"
    body += table(rows, columns or list(rows[0].keys()))
    publish(args, name, body, rows=rows, roofs=roofs)


_gemm = {}


def gemm_gflops(dtype, rounds=3):
    """The machine's GEMM GFLOP/s for `dtype` (square matmul), measured once per run: the roof
    the suites' GFLOP/s are read against."""
    if dtype not in _gemm:
        # bf16 matmul runs a slow fallback on CPUs without bf16 dot products: size it small
        n = 2048 if dtype == torch.float32 else 512
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best, _ = interleaved({"mm": lambda: a @ b}, rounds=rounds)
        _gemm[dtype] = 2 * n**3 / best["mm"] / 1e9 if best["mm"] else None
    return _gemm[dtype]


def raise_recompile_limit(limit=256):
    """Every size recompiles a dynamic=False torch.compile'd peer (FlexAttention); past
    dynamo's recompile limit it would silently run eagerly (unfused, N x N scores)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)


def peak_memory_mb(fn, device="cpu"):
    """Peak memory added while fn runs, in MiB (benchmarks/_memory.py says how)."""
    with Peak(device) as peak:
        fn()
    return peak.read()


def cpu_model():
    from attention_ext import _info  # the environment report reads it the same way

    return _info._cpu()[0]


def _isa():
    import attention_ext

    return attention_ext.cpu_isa()


def run_header(suite, doc, contenders, args):
    """What a suite's run prints first: the machine, the ISA path, torch, the contenders."""
    import attention_ext

    summary = " ".join((doc or "").strip().split("\n\n")[0].split())  # the docstring's first paragraph
    lines = [("suite", f"{suite} ({mode(args)} sizes): {summary}"),
             ("CPU", f"{cpu_model()}, {os.cpu_count()} cores"),
             ("ISA path", f"{_isa()} (available: {', '.join(attention_ext.available_cpu_isas())})"),
             ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads"
                       + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")),
             ("allocator", policy_line().removeprefix("allocator: ")),
             ("contenders", ", ".join(contenders) if contenders else "see the suite's docstring")]
    _console.header(lines)


def machine_line():
    cpu = cpu_model()
    isa = _isa()
    line = (f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, attention_ext CPU path `{isa}`, {policy_line()}")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def commit_hash():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def write_section(name, body, path=RESULTS):
    """Replaces (or appends) the section `name` of benchmarks/RESULTS.md (or `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEach section is rewritten by the command it names.\n"
    begin, end = f"<!-- section:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def header(title, command):
    return (f"## {title}\n\n`{command}`\n\n{machine_line()}, commit `{commit_hash()}`, "
            f"{time.strftime('%Y-%m-%d')}.\n")


def table(rows, columns):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def _fmt(x):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    return str(x)


def command_line():
    return "python -m benchmarks " + " ".join(sys.argv[1:])
