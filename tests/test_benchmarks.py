"""Benchmark suites run end to end at smoke size (--quick, RESULTS.md untouched), and their
contenders compute the same function as ours."""

import pytest

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
    rows = [line for line in out.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert len(rows) == 2, out  # one global row, one windowed
    header = next(line for line in out.splitlines() if line.startswith("| dtype"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for line in rows:
        row = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        for peer in ("sdpa", "loop", "flex"):
            assert row[f"fwd {peer}/ours"] != "–", row  # every peer ran
        # every peer's output as ours: fp32 to accumulation-order rounding, bf16 to its 8-bit mantissa
        assert float(row["max diff vs ours"]) <= (1e-4 if row["dtype"] == "float32" else 5e-2), row


def test_routing_quick(capsys):
    from benchmarks import bench_routing
    from benchmarks.__main__ import main

    before = bench_routing.U.RESULTS.read_text()
    main(["routing", "--quick", "--no-write", "--sizes", "256", "--clusters", "8"])
    out = capsys.readouterr().out
    assert bench_routing.U.RESULTS.read_text() == before
    header = next(line for line in out.splitlines() if line.startswith("| N"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
            for line in out.splitlines() if line.startswith("| 256")]
    assert [r["causal"] for r in rows] == ["False", "True"] and all(r["window"] == "32" for r in rows), out
    for row in rows:
        for col in ("fwd dense/ours", "fwd window/ours", "f+b dense/ours", "f+b window/ours", "mem ours MiB"):
            assert row[col] != "–", row  # every contender ran
