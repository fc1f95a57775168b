"""The avx512bf16 build: bf16 inputs run their tile products on AVX512-BF16 dot products
(bf16 operands in VNNI pairs, fp32 accumulation, P and dS rounded to bf16). Forced here
against the float64 reference for every pattern under the 2x-PyTorch-bf16-error rule
(reference.check_close), with odd Nk and odd D (the pair padding), packed sequences,
thread-count determinism, and the ISA choice on CPUs without bf16 dot products."""

import pytest
import torch

import attention_ext as ae
from attention_ext import _isa
import reference as R
from _harness import check_attention, make_qkv, pattern_cases

HAVE = "avx512bf16" in ae.available_cpu_isas()
needs_bf16 = pytest.mark.skipif(not HAVE, reason="CPU or build without AVX512-BF16")


@pytest.fixture
def bf16_path():
    before = ae.cpu_isa()
    ae.set_cpu_isa("avx512bf16")
    assert ae.cpu_isa() == "avx512bf16"
    yield
    ae.set_cpu_isa(before)


LAYOUT = ae.patterns.bigbird(150, 16, num_heads=2, seed=3)


@needs_bf16
@pytest.mark.parametrize("case", pattern_cases(150, LAYOUT, nq_dense=77), ids=lambda c: c[0])
@pytest.mark.parametrize("D", [64, 37], ids=lambda d: f"D{d}")
def test_patterns_match_reference(bf16_path, case, D):
    # Nk = 150 leaves a partial key tile; odd D pads the pairs along D
    _, fn, mask, nq = case
    q, k, v = make_qkv(1, 2, 1, nq, 150, D, dtype=torch.bfloat16)
    check_attention(fn, q, k, v, mask)


@needs_bf16
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths_gqa_and_dv(bf16_path, causal):
    # odd Nq, Nk (bwd key tiles of odd length: pairs padded per tile), Dv != D, GQA
    q, k, v = make_qkv(2, 4, 2, 67, 33, 19, Dv=21, dtype=torch.bfloat16)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, return_lse=True), q, k, v,
                    R.causal_mask(67, 33) if causal else None)


@needs_bf16
@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences(bf16_path, causal):
    lens = [0, 1, 5, 70, 3, 131, 17]  # odd document starts: pairs never straddle documents
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    q, k, v = make_qkv(1, 4, 2, n, n, 24, dtype=torch.bfloat16)
    doc = R.causal_mask if causal else (lambda a, b: torch.ones(a, b, dtype=torch.bool))
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True),
                    q, k, v, R.packed_mask(cu, cu, doc))


@needs_bf16
def test_large_scores(bf16_path):
    # nearly one-hot P: the scale folded into the fp32 scores keeps Q and K exact bf16
    q, k, v = make_qkv(1, 2, 2, 200, 300, 64, dtype=torch.bfloat16, scale_inputs=3.0)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, return_lse=True), q, k, v, None)


@needs_bf16
def test_bf16_products_really_run(bf16_path):
    # bf16 inputs: P rounded to bf16 moves the output away from the fp32-product build;
    # fp32 inputs: the same code as the avx512 build, bit for bit
    q, k, v = make_qkv(1, 2, 1, 300, 300, 64, dtype=torch.bfloat16)
    ours = ae.flash_attention(q, k, v)
    x32 = [t.detach().float() for t in (q, k, v)]
    f32 = ae.flash_attention(*x32)
    ae.set_cpu_isa("avx512")
    try:
        other = ae.flash_attention(q, k, v)
        f32_avx512 = ae.flash_attention(*x32)
    finally:
        ae.set_cpu_isa("avx512bf16")
    assert not torch.equal(ours, other)
    assert torch.equal(f32, f32_avx512)


@needs_bf16
def test_backward_same_bits_for_1_and_2_threads(bf16_path):
    q, k, v = make_qkv(1, 4, 2, 300, 250, 40, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = ae.flash_attention(q, k, v, causal=True)
            results.append((out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_bf16
def test_nonfinite_values_as_the_fp32_product_build(bf16_path):
    # V and K rows with NaN/inf are packed as zeros and added back only where P / dS is
    # non-zero (gemm_guarded's semantics): the causal mask hides the last key from the
    # other rows, whose outputs stay finite; the non-finite pattern of every result is
    # the avx512 build's
    q, k, v = (t.detach() for t in make_qkv(1, 1, 1, 40, 40, 16, dtype=torch.bfloat16))
    v[0, 0, 39, 3] = float("nan")
    k[0, 0, 39, 5] = float("inf")

    def run():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ae.flash_attention(*x, causal=True)
        return [out] + list(torch.autograd.grad(out, x, torch.ones_like(out)))

    ours = run()
    ae.set_cpu_isa("avx512")
    try:
        fp32_products = run()
    finally:
        ae.set_cpu_isa("avx512bf16")
    assert torch.isfinite(ours[0][0, 0, :39]).all() and not torch.isfinite(ours[0][0, 0, 39]).all()
    for a, b in zip(ours, fp32_products):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))


def test_without_bf16_dot_products_avx512bf16_is_not_chosen(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert "avx512bf16" not in _isa.available_cpu_isas()
    with pytest.raises(RuntimeError, match="not available"):
        ae.set_cpu_isa("avx512bf16")
    first = _isa.available_cpu_isas()[0]
    assert first != "avx512bf16"
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        assert first == "avx512"


@needs_bf16
@pytest.mark.parametrize("kn,nn", [(1, 1), (5, 3), (37, 19), (64, 16)])
def test_vnni_pack_round_trips_with_padding(bf16_path, kn, nn):
    # odd kn pads the last pair with a zero row; ldn > nn pads every pair row with zeros
    x = torch.randn(kn, nn).to(torch.bfloat16)
    x[kn // 2, nn - 1] = float("nan")  # a non-finite row is flagged and packed as zeros
    ldn, k_pad = nn + 5, kn + kn % 2 + 2
    packed, bad = ae._C._pack_vnni(x, ldn, k_pad)
    assert packed.shape == (k_pad // 2, ldn, 2)
    rows = packed.permute(0, 2, 1).reshape(k_pad, ldn)  # row k = pair k // 2, lane k % 2
    want = torch.zeros(k_pad, ldn, dtype=torch.bfloat16)
    want[:kn, :nn] = x
    want[kn // 2] = 0
    assert torch.equal(rows, want)
    flags = torch.zeros(k_pad, dtype=torch.uint8)
    flags[kn // 2] = 1
    assert torch.equal(bad, flags)


def test_vnni_pack_refused_without_bf16_tiles():
    before = ae.cpu_isa()
    try:
        ae.set_cpu_isa("default")
        with pytest.raises(RuntimeError, match="no bf16 tile products"):
            ae._C._pack_vnni(torch.zeros(2, 2, dtype=torch.bfloat16), 2, 2)
    finally:
        ae.set_cpu_isa(before)
