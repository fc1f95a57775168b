"""The decode benchmark runs end to end at smoke size (--quick, RESULTS.md untouched), every
contender runs, and they compute the same function as ours."""

import pytest

from _harness import table_rows

pytest.importorskip("transformers", reason="the end-to-end part generates with transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes (conftest.py)


def test_decode_quick(capsys):
    from benchmarks import bench_decode
    from benchmarks.__main__ import main, suites

    assert "decode" in suites()
    before = bench_decode.U.RESULTS.read_text()
    main(["decode", "--quick", "--no-write"])
    out = capsys.readouterr().out
    assert bench_decode.U.RESULTS.read_text() == before
    rows = table_rows(out, "dtype", lambda line: line.startswith(("| float32", "| bfloat16")))
    assert len(rows) == 4, out  # 2 dtypes x (one token, one chunk)
    for row in rows:
        for name in ("ours", "paged16", "paged256", "rolling", "sdpa_concat", "sdpa_static"):
            assert row[f"{name} ms"] != "–", row  # every contender ran
        assert row["alibi/ours"] != "–", row  # and the ALiBi step
        # every contender's output as ours: fp32 to accumulation-order rounding, bf16 to its 8-bit mantissa
        assert float(row["max diff vs ours"]) <= (1e-4 if row["dtype"] == "float32" else 5e-2), row
    e2e = table_rows(out, "cache", lambda line: line.startswith(("| dynamic", "| static")))
    assert len(e2e) == 2 and all(r["same tokens"] == "yes" and r["sdpa/ours"] != "–" for r in e2e), e2e
    roll = table_rows(out, "generated tokens",
                      lambda line: line.startswith("| ") and line.split("|")[1].strip().isdigit())
    assert len(roll) == 2, out
    # the ring's buffers do not grow with the generated length; the contiguous cache's do
    assert roll[0]["rolling cache MiB"] == roll[1]["rolling cache MiB"], roll
    assert float(roll[1]["contiguous cache MiB"]) > float(roll[0]["contiguous cache MiB"]), roll
