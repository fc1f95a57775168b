"""The neighborhood benchmark: its peers' mask (Flex mask_mod and SDPA's dense mask) is NATTEN's
rule, and the suite runs end to end at smoke size (--quick, RESULTS.md untouched)."""

import pytest
import torch

import reference as R
from _harness import table_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes (conftest.py)


@pytest.mark.parametrize("case", [((9, 12), (3, 6), (2, 1)), ((5, 6, 7), (3, 2, 5), (1, 3, 1)), ((20,), (7,), (2,))])
def test_peer_mask_is_natten_rule(case):
    from benchmarks import bench_neighborhood as B

    spatial, ks, dil = case
    assert torch.equal(B.dense_mask(spatial, ks, dil), R.natten_mask(spatial, ks, dil))


def test_neighborhood_quick(capsys):
    from benchmarks import bench_neighborhood as B
    from benchmarks.__main__ import main, suites

    assert "neighborhood" in suites()
    before = B.U.RESULTS.read_text()
    main(["neighborhood", "--quick", "--no-write"])
    out = capsys.readouterr().out
    assert B.U.RESULTS.read_text() == before
    rows = table_rows(out, "dtype", lambda line: line.startswith("| float32"))
    assert len(rows) == 1, out
    for name in ("fwd sdpa/ours", "fwd flex/ours", "f+b sdpa/ours", "fwd ours ns/(token·key)"):
        assert rows[0][name] != "–", rows[0]  # every contender ran
