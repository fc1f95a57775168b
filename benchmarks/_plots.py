"""A suite's plots from its table rows, by their column names (matplotlib, Agg backend):

- time against N, log-log, ours and each peer ('fwd ours ms' with 'fwd <peer>/ours', or
  '<name> ms' / '<name> s' columns);
- our t(2N)/t(N) against N, with the linear (2) and quadratic (4) lines;
- peak memory against N ('mem <name> MiB');
- our GFLOP/s against N ('fwd GFLOP/s', 'f+b GFLOP/s') under the GEMM roof measured in the
  same run.

One panel per combination of the rows' other settings (dtype, D, causal, window...); a plot
needs rows at two or more N of one combination, so suites without an N column get none.
"""

import re
from pathlib import Path

SKIP = {"N", "notes", "calls", "max diff vs ours"}  # not settings that tell series apart
_COUNT = re.compile(r" \(\d+\)$")  # '64-256 (62)': the count in brackets grows with N, the setting does not
_TIME = re.compile(r"^(?:(fwd|f\+b) )?(.+?) (ms|s)$")
_RATIO = re.compile(r"^(?:(fwd|f\+b) )?(\S+)/ours$")
_MEM = re.compile(r"^mem (.+) MiB$")
_TAGS = {"fwd": "forward", "f+b": "forward+backward", "": "time"}


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _settings(rows):
    """The columns that tell the rows' series apart: not N, not measures (floats)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return [c for c in cols if c not in SKIP and not any(isinstance(r.get(c), float) for r in rows)]


def _groups(rows):
    keys = _settings(rows)
    out = {}
    for r in rows:
        if _num(r.get("N")):
            key = tuple((k, _COUNT.sub("", v) if isinstance(v, str) else v) for k, v in ((k, r.get(k)) for k in keys))
            out.setdefault(key, []).append(r)
    # a series needs two sizes, and one row per size (else the settings do not tell it apart: no plot, not a wrong one)
    return {g: sorted(rs, key=lambda r: r["N"]) for g, rs in out.items()
            if len({r["N"] for r in rs}) >= 2 and len({r["N"] for r in rs}) == len(rs)}


def times(row):
    """{tag: {contender: seconds}} of one row (tag 'fwd', 'f+b' or '')."""
    out = {}
    for col, v in row.items():
        m = _TIME.match(col)
        if m and _num(v) and not col.startswith("mem "):
            out.setdefault(m.group(1) or "", {})[m.group(2)] = v * (1e-3 if m.group(3) == "ms" else 1.0)
    for col, v in row.items():
        m = _RATIO.match(col)
        tag = m and (m.group(1) or "")
        if m and _num(v) and "ours" in out.get(tag, {}):
            out[tag].setdefault(m.group(2), v * out[tag]["ours"])
    return out


def _label(group):
    return ", ".join(f"{k}={v}" for k, v in group) or "all rows"


def _finish(ax, group, rs, ylabel):
    """Title, labels with units, N ticks at the measured sizes (not 10^k), grid, legend."""
    ns = sorted({r["N"] for r in rs})
    ax.set(title=_label(group), xlabel="N (tokens)", ylabel=ylabel)
    ax.set_xticks(ns, [str(n) for n in ns], minor=False)
    ax.set_xticks([], minor=True)
    if ax.get_yscale() == "log":  # ticks at 1, 2, 5 x 10^k labelled 20, 50, 100, not 10^2
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _figure(title, n, plt):
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.6 * ncols, 7.0), 3.6 * nrows + 1.0), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes.flat[:n])


def _save(fig, path, plt):
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_suite(suite, rows, out_dir, subtitle, roofs=None):
    """Writes out_dir/<suite>-*.png from `rows`; returns {what: path}. roofs: {dtype name:
    GEMM GFLOP/s} measured in this run (a callable dtype name -> GFLOP/s is also accepted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    if not groups:
        return {}
    out_dir = Path(out_dir)
    written = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = {}  # one colour per contender in every panel and plot

    def colour(name):
        return palette[order.setdefault(name, len(order)) % len(palette)]

    colour("ours")
    tags = sorted({t for rs in groups.values() for r in rs for t, c in times(r).items() if len(c) and "ours" in c})
    for tag in tags:  # time against N
        fig, axes = _figure(f"{suite}: {_TAGS[tag]} time against N\n{subtitle}", len(groups), plt)
        for ax, (g, rs) in zip(axes, groups.items()):
            names = list(dict.fromkeys(n for r in rs for n in times(r).get(tag, {})))
            for name in names:
                pts = [(r["N"], times(r)[tag][name] * 1e3) for r in rs if name in times(r).get(tag, {})]
                ax.loglog(*zip(*pts), marker="o", lw=2.4 if name == "ours" else 1.3, label=name, color=colour(name))
            _finish(ax, g, rs, "time per call (ms)")
        stem = {"f+b": "fb", "": "all"}.get(tag, tag)
        written[f"time {_TAGS[tag]}"] = _save(fig, out_dir / f"{suite}-time-{stem}.png", plt)

    fig, axes = _figure(f"{suite}: scaling of ours, t(2N)/t(N)\n{subtitle}", len(groups), plt)
    any_scaling = False
    for ax, (g, rs) in zip(axes, groups.items()):
        by_n = {r["N"]: times(r) for r in rs}
        for tag in tags:
            pts = [(n, by_n[n][tag]["ours"] / by_n[n // 2][tag]["ours"]) for n in sorted(by_n)
                   if n // 2 in by_n and "ours" in by_n[n].get(tag, {}) and "ours" in by_n[n // 2].get(tag, {})]
            if pts:
                any_scaling = True
                ax.semilogx(*zip(*pts), marker="o", label=f"ours, {_TAGS[tag]}")
        ax.axhline(2.0, color="grey", ls="--", lw=1, label="2: linear in N")
        ax.axhline(4.0, color="grey", ls=":", lw=1, label="4: quadratic in N")
        ax.set_ylim(0, 5)
        _finish(ax, g, rs, "t(2N) / t(N)")
    if any_scaling:
        written["scaling t(2N)/t(N)"] = _save(fig, out_dir / f"{suite}-scaling.png", plt)
    else:
        plt.close(fig)

    mems = sorted({m.group(1) for r in rows for c, v in r.items() if (m := _MEM.match(c)) and _num(v)})
    if mems:
        fig, axes = _figure(f"{suite}: peak memory against N\n{subtitle}", len(groups), plt)
        for ax, (g, rs) in zip(axes, groups.items()):
            for name in mems:
                pts = [(r["N"], r[f"mem {name} MiB"]) for r in rs
                       if _num(r.get(f"mem {name} MiB")) and r[f"mem {name} MiB"] > 0]
                if pts:
                    ax.loglog(*zip(*pts), marker="o", lw=2.4 if name == "ours" else 1.3, label=name,
                              color=colour(name))
            _finish(ax, g, rs, "peak memory added (MiB)")
        written["peak memory"] = _save(fig, out_dir / f"{suite}-memory.png", plt)

    rates = [c for c in ("fwd GFLOP/s", "f+b GFLOP/s") if any(_num(r.get(c)) for r in rows)]
    if rates:
        fig, axes = _figure(f"{suite}: achieved GFLOP/s of ours against the GEMM roof\n{subtitle}", len(groups), plt)
        for ax, (g, rs) in zip(axes, groups.items()):
            for col in rates:
                pts = [(r["N"], r[col]) for r in rs if _num(r.get(col))]
                ax.semilogx(*zip(*pts), marker="o", label=f"ours, {col.split()[0]}")
            dtype = dict(g).get("dtype", "float32")
            roof = roofs(dtype) if callable(roofs) else (roofs or {}).get(dtype)
            if roof:
                ax.axhline(roof, color="black", ls="--", lw=1, label=f"{dtype} GEMM roof ({roof:.0f})")
            ax.set_ylim(bottom=0)
            _finish(ax, g, rs, "GFLOP/s")
        written["GFLOP/s vs GEMM roof"] = _save(fig, out_dir / f"{suite}-gflops.png", plt)
    return written
