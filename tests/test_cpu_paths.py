"""Every CPU kernel build (ISA path) this machine can run, forced in turn, against the
float64 reference; and the accuracy of the softmax's vectorised exp2."""

import pytest
import torch

import attention_ext as ae
import reference as R
from _harness import check_attention, make_qkv

ISAS = ae.available_cpu_isas()


@pytest.fixture
def isa(request):
    before = ae.cpu_isa()
    ae.set_cpu_isa(request.param)
    assert ae.cpu_isa() == request.param
    yield request.param
    ae.set_cpu_isa(before)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_each_isa_matches_reference(isa, dtype):
    q, k, v = make_qkv(2, 4, 2, 157, 203, 80, Dv=48, dtype=dtype)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, return_lse=True), q, k, v,
                    R.causal_mask(157, 203))
    q, k, v = make_qkv(1, 2, 1, 190, 190, 32, dtype=dtype)
    check_attention(lambda q, k, v: ae.sliding_window_attention(q, k, v, (9, 4), dilation=2, global_tokens=2,
                                                                return_lse=True), q, k, v,
                    R.window_mask(190, 190, 9, 4, dilation=2) |
                    R.global_mask_2d(190, 190, torch.arange(190) < 2))
    layout = ae.patterns.bigbird(190, 16, num_heads=2, seed=1)
    check_attention(lambda q, k, v: ae.block_sparse_attention(q, k, v, layout, block_size=16, return_lse=True),
                    q, k, v, R.block_mask(layout, 16, 190, 190).unsqueeze(0))
    # softcap: the vectorised tanh of each build, forward and backward
    q, k, v = make_qkv(1, 2, 1, 120, 150, 64, dtype=dtype, scale_inputs=2.0)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, softcap=3.0, return_lse=True), q, k,
                    v, R.causal_mask(120, 150), softcap=3.0)
    # key_mask: left padding of 40 keys
    km = torch.arange(150).view(1, -1) >= 40
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, key_mask=km, return_lse=True), q, k,
                    v, R.causal_mask(120, 150) & km)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_isas_agree_closely(isa):
    # the builds differ in vector width and blocking, not in math
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64)
    ours = ae.flash_attention(q, k, v, causal=True)
    ref, _ = R.attention(q, k, v, R.causal_mask(300, 300))
    assert (ours.double() - ref).abs().max() < 2e-6


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_exp2_accuracy(isa):
    x = torch.cat([torch.linspace(-126.0, 127.0, 1_000_003), torch.randn(100_000) * 10,
                   torch.tensor([0.0, -0.5, 0.5, 1.0, -1.0, 126.9])])
    y = ae._C._exp2_poly(x)
    exact = torch.exp2(x.double())
    rel = ((y.double() - exact) / exact).abs().max().item()
    # documented in vec_math.h: a degree-5 fit, max relative error 2.2e-7 (about 2 ulp);
    # the portable build calls std::exp2
    assert rel <= 2.5e-7, f"{isa}: exp2 max relative error {rel:.3e}"
    special = ae._C._exp2_poly(torch.tensor([float("-inf"), -127.0, -1000.0, float("nan")]))
    assert special[:3].eq(0).all(), "inputs below -126 (masked scores) must give exactly 0"
    assert torch.isnan(special[3])


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="isa must be one of"):
        ae.set_cpu_isa("sse9")
    missing = [i for i in ("avx512bf16", "avx512", "avx2") if i not in ISAS]
    for name in missing:
        with pytest.raises(RuntimeError, match="not available"):
            ae.set_cpu_isa(name)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_tanh_accuracy(isa):
    x = torch.cat([torch.linspace(-20.0, 20.0, 1_000_001), torch.randn(100_000) * 3,
                   torch.tensor([0.0, -0.0, 0.3, -0.3, 0.29999998, 1e-30, -1e-30, 1e-3])])
    y = ae._C._tanh_fast(x)
    exact = torch.tanh(x.double())
    nz = exact != 0
    rel = ((y.double() - exact)[nz] / exact[nz]).abs().max().item()
    # documented in vec_math.h: max relative error 4e-7 (a few ulp); the portable build
    # runs the same formulas on ATen's generic vectors
    assert rel <= 5e-7, f"{isa}: tanh max relative error {rel:.3e}"
    assert y[x == 0].eq(0).all()
    special = ae._C._tanh_fast(torch.tensor([float("inf"), float("-inf"), 1e6, -1e6, float("nan")]))
    assert special[:4].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert torch.isnan(special[4])
