"""What a benchmark run prints as it goes: a header, one aligned table line per finished row
(ratios coloured on a terminal: green where ours is faster), a progress bar, and one line
per contender that did not run."""

import os
import sys

from tqdm import tqdm

_live = {"bar": None, "cols": None}


def _colour():
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def say(line=""):
    """Prints a line above the progress bar (if one runs)."""
    if _live["bar"] is not None:
        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def is_ratio(col):
    """'fwd sdpa/ours', 'sdpa/ours', 'concat/ours': a peer's time over ours (> 1: ours faster)."""
    return col.endswith("/ours")


def _split(col):
    """A column name on two header lines ('fwd' / 'sdpa/ours'), so that the table stays narrow."""
    head, _, tail = col.partition(" ")
    return (head, tail) if tail else ("", head)


def _cell(col, text, value, width):
    cell = text.rjust(width)
    if _colour() and is_ratio(col) and isinstance(value, float):
        code = "32" if value > 1.0 else "31"  # green: ours faster, red: ours slower
        return f"\033[1;{code}m{cell}\033[0m"
    return cell


def row_line(row, fmt):
    """Prints `row` as a line of an aligned table; a (two-line) column header first, again
    whenever the columns change."""
    cols = [c for c in row if c != "notes"]
    if _live["cols"] is None or [c for c, _ in _live["cols"]] != cols:
        # room for the values of later rows too: numbers up to 6 characters, strings like 'bfloat16'
        widths = [max(len(_split(c)[0]), len(_split(c)[1]), len(fmt(row[c])), 8 if isinstance(row[c], str) else 6)
                  for c in cols]
        _live["cols"] = list(zip(cols, widths))
        say("")
        say("  ".join(_split(c)[0].rjust(w) for c, w in _live["cols"]))
        say("  ".join(_split(c)[1].rjust(w) for c, w in _live["cols"]))
        say("  ".join("-" * w for _, w in _live["cols"]))
    say("  ".join(_cell(c, fmt(row[c]), row[c], max(w, len(fmt(row[c])))) for c, w in _live["cols"]))


def failures(errors):
    """One line per contender that raised or was skipped, with its reason."""
    for name, reason in (errors or {}).items():
        say(f"    ! {name} did not run: {reason}")


def header(lines):
    """The run's header: `lines` as (label, value) pairs, aligned."""
    _live["cols"] = None
    width = max(len(k) for k, _ in lines)
    say("")
    for k, v in lines:
        say(f"{k.ljust(width)}  {v}")


def progress(cases, label=str, cost=None):
    """Iterates `cases` under a progress bar: cases done, the current case (label(case)) and
    the time left. cost(case) weighs the cases (e.g. by their flops) so that the estimate of
    the time left does not assume that the last, largest cases take as long as the first."""
    cases = list(cases)
    costs = [float(cost(c)) if cost else 1.0 for c in cases]
    bar = tqdm(total=sum(costs), file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=1.0,
               bar_format="|{bar:20}| {elapsed} elapsed, ~{remaining} left, {desc}")
    _live["bar"] = bar
    try:
        for i, (case, c) in enumerate(zip(cases, costs)):
            bar.set_description_str(f"{i}/{len(cases)} cases done, now: {label(case)}")
            yield case
            bar.update(c)
    finally:
        bar.close()
        _live["bar"] = None
