"""Benchmark suites run end to end at smoke size (--quick, RESULTS.md untouched), and their
contenders compute the same function as ours."""

import pytest

from _harness import table_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes (conftest.py)


def test_varlen_quick(capsys):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from benchmarks import bench_varlen
    from benchmarks.__main__ import main, suites

    assert "varlen" in suites()
    before = bench_varlen.U.RESULTS.read_text()
    main(["varlen", "--quick", "--no-write"])
    out = capsys.readouterr().out
    assert bench_varlen.U.RESULTS.read_text() == before
    rows = table_rows(out, "dtype", lambda line: line.startswith(("| float32", "| bfloat16")))
    assert len(rows) == 2, out  # one global row, one windowed
    for row in rows:
        for peer in ("sdpa", "loop", "flex"):
            assert row[f"fwd {peer}/ours"] != "–", row  # every peer ran
        # every peer's output as ours: fp32 to accumulation-order rounding, bf16 to its 8-bit mantissa
        assert float(row["max diff vs ours"]) <= (1e-4 if row["dtype"] == "float32" else 5e-2), row


def test_flash_quick_cli_prints_header_and_table(tmp_path):
    """What a newcomer sees: the header, aligned table lines, no dict reprs, nothing written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    before = (root / "benchmarks" / "RESULTS.md").read_text()
    out = subprocess.run([sys.executable, "-m", "benchmarks", "flash", "--quick", "--no-write"], cwd=root,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    for label in ("suite", "CPU", "ISA path", "torch", "contenders"):
        assert any(line.startswith(label + " ") for line in out.splitlines()), out
    assert "ours, sdpa, naive" in out
    lines = out.splitlines()
    # the live tables: a header (repeated when a row brings new columns, e.g. bf16's
    # ours_avx512 on AVX512-BF16 CPUs), a rule, then one aligned cell per column in each row
    live = []
    for i, line in enumerate(lines):
        if line.split()[:2] == ["dtype", "N"]:
            assert set(lines[i + 1].replace(" ", "")) == {"-"}, lines[i + 1]
            ncols = len(lines[i + 1].split())  # the rule's dash groups
            for row in lines[i + 2:]:
                if not row.strip() or row.split()[0] not in ("float32", "bfloat16"):
                    break
                assert len(row.split()) == ncols, (line, row)
                live.append(row.split())
    assert [cells[0] for cells in live] == ["float32"] * 4 + ["bfloat16"] * 4, out  # 2 dtypes x 2 sizes x causal
    assert all(float(c) > 0 for c in live[0][4:]), live[0]  # times, ratios, GFLOP/s, memory: measured numbers
    assert "{'" not in out and "': " not in out, out  # no dict reprs
    assert (root / "benchmarks" / "RESULTS.md").read_text() == before
    assert "Plots:" not in out  # --no-write: no plots


def test_plots_written_at_tiny_sizes(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    from benchmarks import _plots

    rows = [{"dtype": dt, "N": n, "fwd ours ms": n / 100, "fwd sdpa/ours": 1.5, "fwd GFLOP/s": 50.0 + n / 100,
             "f+b ours ms": n / 30, "f+b sdpa/ours": 0.8, "mem ours MiB": n / 64, "mem sdpa MiB": n / 32}
            for dt in ("float32", "bfloat16") for n in (64, 128, 256)]
    written = _plots.plot_suite("tiny", rows, tmp_path, "test CPU, commit abc", roofs={"float32": 120.0})
    assert set(written) == {"time forward", "time forward+backward", "scaling t(2N)/t(N)", "peak memory",
                            "GFLOP/s vs GEMM roof"}
    for path in written.values():
        assert path.parent == tmp_path and path.name.startswith("tiny-")
        with PIL.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300, im.size  # two panels, legible
    # a suite without two sizes of one setting plots nothing
    assert _plots.plot_suite("one", rows[:1], tmp_path, "x") == {}
    # series by setting: a trailing count in brackets is not one; rows no setting tells apart make no series
    docs = [{"N": n, "docs": f"{d} ({n // 64})", "fwd ours ms": 1.0} for d in ("64-256", "64-4096") for n in (64, 128)]
    assert list(_plots._groups(docs)) == [(("docs", "64-256"),), (("docs", "64-4096"),)]
    assert _plots._groups([{k: v for k, v in r.items() if k != "docs"} for r in docs]) == {}
    # the time plot reads peers back from the ratio columns: sdpa = 1.5 x ours
    assert _plots.times(rows[0])["fwd"] == pytest.approx({"ours": 64e-5, "sdpa": 96e-5})


def test_report_writes_plots_only_where_asked(tmp_path, capsys):
    import argparse

    from benchmarks import _util as U

    rows = [{"N": n, "fwd ours ms": n / 100.0} for n in (64, 128)]
    args = argparse.Namespace(quick=True, no_write=True, plots_dir=None, mode="quick")
    U.report(args, "tiny", "t", "notes", rows)
    assert "Plots:" not in capsys.readouterr().out
    args.plots_dir = str(tmp_path)
    U.report(args, "tiny", "t", "notes", rows)
    out = capsys.readouterr().out
    assert "Plots: [time forward](" in out and (tmp_path / "tiny-time-fwd.png").exists(), out
    assert U.sized(args, {"quick": 1, "full": 3}) == 1 and U.sized(argparse.Namespace(), {"full": 3}) == 3


def test_routing_quick(capsys):
    from benchmarks import bench_routing
    from benchmarks.__main__ import main

    before = bench_routing.U.RESULTS.read_text()
    main(["routing", "--quick", "--no-write", "--sizes", "256", "--clusters", "8"])
    out = capsys.readouterr().out
    assert bench_routing.U.RESULTS.read_text() == before
    rows = table_rows(out, "N", lambda line: line.startswith("| 256"))
    assert [r["causal"] for r in rows] == ["False", "True"] and all(r["window"] == "32" for r in rows), out
    for row in rows:
        for col in ("fwd dense/ours", "fwd window/ours", "f+b dense/ours", "f+b window/ours", "mem ours MiB"):
            assert row[col] != "–", row  # every contender ran


def test_tile_products_quick(capsys):
    """Our bf16 tile product and oneDNN's brgemm compute the same C at every tile shape."""
    import attention_ext as ae
    from benchmarks.__main__ import main

    if "avx512bf16" not in ae.available_cpu_isas():
        pytest.skip("no bf16 tile products on this CPU")
    main(["tile_products", "--quick", "--no-write"])
    out = capsys.readouterr().out
    rows = table_rows(out, "product", lambda line: line.startswith(("| fwd", "| bwd")))
    assert len(rows) == 4, out
    for row in rows:
        assert float(row["ours us"]) > 0 and float(row["brgemm us"]) > 0, row
        # the same bf16 products summed in fp32 in another order: |C| ~ sqrt(K) ~ 10
        assert float(row["max diff"]) < 1e-3, row
