"""CUDA kernels of attention_fwd / attention_bwd (tensor-core fp16/bf16, SIMT fp32/fp64)
against the float64 dense reference of tests/reference.py, built from explicit boolean
masks. The ops are called directly (torch.ops.attention_ext.*).

Inputs are drawn in float64 and rounded through bfloat16, so that one float64
reference serves every dtype (bf16 values are exact in fp16, fp32 and fp64)."""

import math
import os

import pytest
import torch

import attention_ext  # noqa: F401  (registers the ops)
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R

# AE_TEST_DEVICE=cpu runs the same checks on the CPU kernels (a check of the tests).
DEV = os.environ.get("AE_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEV == "cuda" and not (torch.cuda.is_available() and attention_ext._C.cuda_built),
                       reason="needs a CUDA device and the CUDA build"),
]

LOWP = (torch.float16, torch.bfloat16)
ALL = (torch.bfloat16, torch.float16, torch.float32)


class Spec:
    """The fields of an AttentionSpec (all but scale) plus the explicit (B or 1, H or 1,
    Nq, Nk) bool mask of the float64 reference and, with dropout, its (B, H, Nq, Nk)
    multiplier (reference.dropout_multiplier)."""

    def __init__(self, mask=None, dropout=None, **fields):
        self.fields, self.mask, self.dropout = fields, mask, dropout

    def at(self, scale):
        """The AttentionSpec with this scale, its tensors on DEV."""
        return AttentionSpec(scale=scale, **{k: x.to(DEV) if torch.is_tensor(x) else x for k, x in self.fields.items()})


def dense(Nq, Nk, causal=False):
    return Spec(causal=causal, mask=R.causal_mask(Nq, Nk) if causal else None)


def window(Nq, Nk, left, right, dilation=1, causal=False, num_global=0, global_mask=None):
    m = R.window_mask(Nq, Nk, left, right, dilation=dilation, causal=causal)
    if num_global or global_mask is not None:
        B = 1 if global_mask is None else global_mask.shape[0]
        per_b = []
        for b in range(B):
            g = torch.zeros(Nk, dtype=torch.bool)
            g[:num_global] = True
            if global_mask is not None:
                g |= global_mask[b]
            per_b.append(m | R.global_mask_2d(Nq, Nk, g, causal=causal))
        m = torch.stack(per_b).unsqueeze(1)  # (B, 1, Nq, Nk)
    return Spec(mask_kind=MASK_KINDS["window"], causal=causal, window_left=left, window_right=right, dilation=dilation,
                num_global=num_global, global_mask=global_mask, mask=m)


def neighborhood(N, kernel_size, dilation=1, causal=False):
    return Spec(mask_kind=MASK_KINDS["neighborhood"], causal=causal, kernel_size=kernel_size, dilation=dilation,
                mask=R.neighborhood_mask(N, kernel_size, dilation=dilation, causal=causal))


def blocks(layout, bs, Nq, Nk, causal=False):
    m = R.block_mask(layout, bs, Nq, Nk).unsqueeze(0)  # (1, H, Nq, Nk)
    if causal:
        m = m & R.causal_mask(Nq, Nk)
    return Spec(mask_kind=MASK_KINDS["block_layout"], causal=causal, block_size=bs, block_layout=layout, mask=m)


def bf16_exact(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(torch.bfloat16).to(torch.float64)


def make(B, Hq, Hkv, Nq, Nk, D, Dv=None):
    Dv = D if Dv is None else Dv
    return bf16_exact(B, Hq, Nq, D), bf16_exact(B, Hkv, Nk, D), bf16_exact(B, Hkv, Nk, Dv)


def reference(q, k, v, spec, scale, g, glse=None):
    """float64 out, lse and gradients of sum(out * g) (+ sum(lse * glse))."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = R.attention(q, k, v, spec.mask, scale=scale, dropout=spec.dropout)
    outs, grads = [out], [g]
    if glse is not None:
        fin = torch.isfinite(lse)
        outs.append(lse.masked_fill(~fin, 0.0))
        grads.append(glse.double() * fin)
    dq, dk, dv = torch.autograd.grad(outs, (q, k, v), grads)
    return out.detach(), lse.detach(), dq, dk, dv


def lowp_grads(q, k, v, spec, scale, g):
    """PyTorch's own same-dtype math (on the GPU): the yardstick of the bf16/fp16 rule."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = R.attention_lowp(q, k, v, None if spec.mask is None else spec.mask.to(DEV), scale=scale,
                           dropout=None if spec.dropout is None else spec.dropout.to(DEV))
    return (out,) + torch.autograd.grad(out, (q, k, v), g)


def run_ops(q, k, v, spec, scale, g, glse=None):
    out, lse = spec.at(scale).forward(q, k, v)
    dq, dk, dv, _ = spec.at(scale).backward(g, glse, q, k, v, out, lse)
    return out, lse, dq, dk, dv


def check(q64, k64, v64, spec, *, dtypes=ALL, scale=None, grads=True, glse=False, prep=None,
          deterministic=False):
    """Runs every dtype on the same (bf16-exact) inputs against one float64 reference.
    prep(t) may turn a contiguous CUDA input into a strided one; deterministic runs our
    ops (only) under torch.use_deterministic_algorithms(True)."""
    scale = 1.0 / math.sqrt(q64.shape[-1]) if scale is None else scale
    Nq = q64.shape[2]
    g64 = bf16_exact(*q64.shape[:3], v64.shape[-1])
    gl64 = bf16_exact(*q64.shape[:3]) if glse else None
    ref = reference(q64, k64, v64, spec, scale, g64, gl64)
    empty = torch.isneginf(ref[1])
    for dtype in dtypes:
        q, k, v, g = (t.to(DEV, dtype) for t in (q64, k64, v64, g64))
        if prep is not None:
            q, k, v, g = (prep(t) for t in (q, k, v, g))
        gl = None if gl64 is None else gl64.to(DEV, torch.float64 if dtype == torch.float64 else torch.float32)
        torch.use_deterministic_algorithms(deterministic)
        try:
            out, lse, dq, dk, dv = run_ops(q, k, v, spec, scale, g if grads else torch.zeros_like(g), gl)
        finally:
            torch.use_deterministic_algorithms(False)
        tag = f"{dtype} Nq={Nq}"
        assert out.dtype == dtype and out.shape == ref[0].shape, tag
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), tag
        for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert not torch.isnan(t).any(), f"{tag}: NaN in {name}"
        # rows that see no key: zero output, lse exactly -inf
        assert torch.equal(torch.isneginf(lse.cpu()), empty), f"{tag}: -inf lse rows differ"
        if empty.any():
            assert torch.all(out.cpu()[empty] == 0), f"{tag}: rows without keys must be 0"
        fin = ~empty
        if fin.any():
            err = (lse.double().cpu()[fin] - ref[1][fin]).abs().max().item()
            tol = (1e-9 if dtype == torch.float64 else 1e-4) * max(1.0, ref[1][fin].abs().max().item())
            assert err <= tol, f"{tag}: lse error {err:.3e} > {tol:.3e}"
        lp = lowp_grads(q, k, v, spec, scale, g) if dtype in LOWP else (None,) * 4
        R.check_close(out, ref[0], lowp=lp[0], what=f"{tag} out")
        if not grads:
            continue
        if empty.any():
            assert torch.all(dq.cpu()[empty] == 0), f"{tag}: dq of rows without keys must be 0"
        for name, ours, r, l in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:], lp[1:]):
            assert ours.dtype == dtype and ours.shape == r.shape, f"{tag} {name}"
            R.check_close(ours, r, lowp=l, what=f"{tag} {name}", fp32_rel=1e-4)


# ---- dense and causal -------------------------------------------------------------------

# (Nq, Nk, D, Dv, Hq, Hkv): odd sizes around the tiles, Nq != Nk both ways, every head-dim
# bucket (and padding inside it), Dv != Dqk, GQA ratios 1, 2, 8.
SHAPES = [
    (1, 1, 64, 64, 2, 1),
    (17, 17, 32, 32, 2, 2),
    (127, 129, 80, 80, 4, 2),
    (129, 127, 128, 128, 8, 1),
    (1000, 1000, 64, 64, 2, 1),
    (17, 1000, 128, 128, 2, 2),
    (1000, 17, 256, 256, 2, 1),
    (1, 1000, 64, 64, 8, 8),
    (65, 300, 64, 32, 4, 2),
    (200, 150, 32, 128, 2, 1),
    (100, 100, 256, 128, 2, 2),
    (70, 90, 20, 12, 2, 1),  # head dims that are not multiples of 8
    (33, 45, 16, 16, 2, 1),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense(shape, causal):
    Nq, Nk, D, Dv, Hq, Hkv = shape
    B = 2 if Nq * Nk < 100_000 else 1
    q, k, v = make(B, Hq, Hkv, Nq, Nk, D, Dv)
    check(q, k, v, dense(Nq, Nk, causal), grads=Nq * Nk <= 300_000 or D <= 64)


def test_float64_and_grad_lse():
    q, k, v = make(2, 4, 2, 37, 53, 24)
    check(q, k, v, dense(37, 53, True), dtypes=(torch.float64, torch.float32), glse=True)
    check(q, k, v, window(37, 53, 5, 3, dilation=2), dtypes=(torch.float64,), glse=True)


def test_float64_gradcheck():
    q, k, v = (t.to(DEV).requires_grad_() for t in make(1, 2, 1, 9, 11, 8))
    spec = dense(9, 11, True).at(0.5)
    torch.autograd.gradcheck(spec.forward, (q, k, v))


def test_large_scores_and_custom_scale():
    q, k, v = make(1, 2, 1, 130, 130, 32)
    check(q * 8, k * 8, v, dense(130, 130, True), scale=0.3)


# ---- local and sparse patterns ---------------------------------------------------------

WINDOWS = [  # (Nq, Nk, left, right, dilation, causal)
    (300, 300, 17, 5, 1, False),
    (257, 257, 0, 33, 1, False),
    (301, 301, 4, 2, 3, False),
    (301, 301, 7, 0, 4, True),
    (100, 333, 20, 10, 1, False),
    (333, 100, 20, 0, 1, True),
    (700, 700, 128, 0, 1, True),
    (1000, 1000, 64, 64, 1, False),
    (200, 200, 0, 0, 1, False),
]


@pytest.mark.parametrize("case", WINDOWS, ids=lambda c: "-".join(map(str, c)))
def test_window(case):
    Nq, Nk, left, right, dil, causal = case
    q, k, v = make(2, 4, 2, Nq, Nk, 64)
    check(q, k, v, window(Nq, Nk, left, right, dilation=dil, causal=causal))


@pytest.mark.parametrize("case", [(200, 7, 1, False), (200, 9, 3, False), (200, 7, 1, True), (257, 15, 2, True)],
                         ids=lambda c: "-".join(map(str, c)))
def test_neighborhood(case):
    N, ks, dil, causal = case
    q, k, v = make(1, 4, 2, N, N, 64)
    check(q, k, v, neighborhood(N, ks, dil, causal))


@pytest.mark.parametrize("bs", [16, 50, 64, 128])
def test_block_layout(bs):
    Nq, Nk, H = 333, 300, 4
    q, k, v = make(2, H, 2, Nq, Nk, 64)
    gen = torch.Generator().manual_seed(bs)
    layout = torch.rand(H, -(-Nq // bs), -(-Nk // bs), generator=gen) < 0.4
    layout[1, 0] = False  # a block row with nothing: zeros, lse -inf
    check(q, k, v, blocks(layout, bs, Nq, Nk))
    shared = layout[:1].clone()
    check(q, k, v, blocks(shared, bs, Nq, Nk, causal=True), dtypes=(torch.bfloat16,))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_global_tokens(causal):
    N = 300
    q, k, v = make(2, 4, 1, N, N, 32)
    gm = torch.zeros(2, N, dtype=torch.bool)
    gm[0, [0, 1, 150, N - 1]] = True
    gm[1, [77]] = True
    check(q, k, v, window(N, N, 16, 0 if causal else 16, causal=causal, global_mask=gm))
    check(q, k, v, window(N, N, 16, 0 if causal else 16, causal=causal, num_global=7))
    # globals with dilation, unequal lengths
    q2, k2, v2 = make(2, 2, 1, 90, 150, 16)
    gm2 = torch.zeros(2, 150, dtype=torch.bool)
    gm2[:, [0, 149]] = True
    check(q2, k2, v2, window(90, 150, 5, 3, dilation=2, num_global=2, global_mask=gm2))


def test_rows_without_keys():
    # causal with Nq > Nk: the first Nq - Nk queries sit before every key
    q, k, v = make(1, 2, 1, 150, 20, 64)
    check(q, k, v, dense(150, 20, True))
    # the same with a causal window, and a dilated one
    q, k, v = make(1, 2, 2, 150, 20, 64)
    check(q, k, v, window(150, 20, 5, 0, causal=True))
    check(q, k, v, window(150, 20, 3, 0, dilation=2, causal=True))


def test_schedule_chunks():
    # more non-empty tiles than one shared-memory schedule chunk holds (forward: key tiles
    # of one query tile; backward: query tiles of one key tile)
    q, k, v = make(1, 1, 1, 64, 64 * 300 + 5, 64)
    check(q, k, v, dense(64, 64 * 300 + 5), dtypes=(torch.bfloat16,))
    q, k, v = make(1, 2, 1, 64 * 130 + 3, 100, 64)
    check(q, k, v, dense(64 * 130 + 3, 100), dtypes=(torch.bfloat16,))


# ---- layouts of the inputs -------------------------------------------------------------

def _fused(t):  # (B, H, N, D) -> a strided view into a (B, N, H, 3D) buffer, like a fused QKV projection
    B, H, N, D = t.shape
    buf = torch.zeros(B, N, H, 3 * D, dtype=t.dtype, device=t.device)
    buf[..., D:2 * D] = t.transpose(1, 2)
    return buf[..., D:2 * D].transpose(1, 2)


def _every_other(t):  # last dim not contiguous
    buf = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def _misaligned(t):  # storage offset of one element: rows not 16-byte aligned
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


@pytest.mark.parametrize("prep", [_fused, _every_other, _misaligned], ids=["fused", "every_other", "misaligned"])
def test_noncontiguous(prep):
    q, k, v = make(2, 4, 2, 77, 91, 64)
    spec = dense(77, 91, True)
    check(q, k, v, spec, prep=prep)
    # forward is bitwise the same as on contiguous copies
    for dtype in ALL:
        qc, kc, vc = (t.to(DEV, dtype) for t in (q, k, v))
        a = spec.at(0.125).forward(prep(qc), prep(kc), prep(vc))
        b = spec.at(0.125).forward(qc, kc, vc)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_expanded_kv_and_grad():
    q, k, v = make(1, 4, 1, 50, 60, 64)
    spec = dense(50, 60)
    for dtype in (torch.bfloat16, torch.float32):
        qc, kc, vc = (t.to(DEV, dtype) for t in (q, k, v))
        ke, ve = kc.expand(1, 2, 60, 64), vc.expand(1, 2, 60, 64)  # stride-0 heads
        out, lse = spec.at(0.125).forward(qc, ke, ve)
        ref = spec.at(0.125).forward(qc, ke.contiguous(), ve.contiguous())
        assert torch.equal(out, ref[0])
        g = torch.randn(1, 1, 1, 64, device=DEV, dtype=dtype).expand_as(out)  # stride-0 upstream gradient
        torch.use_deterministic_algorithms(True)
        try:
            a = spec.at(0.125).backward(g, None, qc, ke, ve, out, lse)
            b = spec.at(0.125).backward(g.contiguous(), None, qc, ke.contiguous(), ve.contiguous(), out, lse)
        finally:
            torch.use_deterministic_algorithms(False)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---- determinism -----------------------------------------------------------------------

DET_CASES = [
    (64, dense(300, 300, True), 300, 300),
    (128, dense(257, 300, False), 257, 300),
    (256, dense(130, 130, True), 130, 130),
    (64, window(400, 400, 40, 0, causal=True), 400, 400),
    (32, window(300, 300, 8, 8, num_global=3), 300, 300),
]


@pytest.mark.parametrize("case", DET_CASES, ids=["d64", "d128", "d256", "window", "global"])
def test_deterministic_backward(case):
    D, spec, Nq, Nk = case
    q, k, v = make(2, 4, 2, Nq, Nk, D)
    check(q, k, v, spec, dtypes=(torch.bfloat16, torch.float16), deterministic=True)
    torch.use_deterministic_algorithms(True)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            qc, kc, vc = (t.to(DEV, dtype) for t in (q, k, v))
            out, lse = spec.at(0.1).forward(qc, kc, vc)
            g = torch.randn_like(out)
            a = spec.at(0.1).backward(g, None, qc, kc, vc, out, lse)
            b = spec.at(0.1).backward(g, None, qc, kc, vc, out, lse)
            for x, y in zip(a, b):
                assert torch.equal(x, y), "deterministic backward must repeat bitwise"
    finally:
        torch.use_deterministic_algorithms(False)


def test_forward_repeats_bitwise():
    q, k, v = (t.to(DEV, torch.bfloat16) for t in make(2, 8, 2, 513, 513, 128))
    spec = dense(513, 513, True)
    a = spec.at(0.1).forward(q, k, v)
    b = spec.at(0.1).forward(q, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_large_head_dim_falls_back():
    # head dims above 256 take the SIMT path in fp16/bf16 too
    q, k, v = make(1, 2, 1, 40, 50, 320, 264)
    check(q, k, v, dense(40, 50, True), dtypes=(torch.bfloat16, torch.float32))


@pytest.mark.skipif(DEV != "cuda", reason="streams are CUDA's")
def test_other_stream():
    q, k, v = (t.to(DEV, torch.bfloat16) for t in make(1, 2, 1, 100, 100, 64))
    spec = dense(100, 100, True)
    ref = spec.at(0.1).forward(q, k, v)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = spec.at(0.1).forward(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out[0], ref[0])


# ---- dropout ---------------------------------------------------------------------------
# The kernels regenerate common/dropout.h's keep decisions (csrc/cuda/dropout.cuh): the
# same elements as the CPU's, bitwise, in the forward and in both backward kernels.

SEED = torch.tensor([0x0123456789ABCDEF, 77], dtype=torch.int64)


def with_dropout(spec, p, B, Hq, Nq, Nk, seed=SEED):
    return Spec(mask=spec.mask, dropout=R.dropout_multiplier(seed, p, B, Hq, Nq, Nk), dropout_p=p, dropout_seed=seed,
                **spec.fields)


# (head dim, spec, Nq, Nk): every tensor-core bucket, odd sizes, Nq != Nk, windows and
# global tokens (Partial tiles), a head dim past the tensor-core limit (SIMT in bf16)
DROPOUT_CASES = [
    (64, dense(300, 300, True), 300, 300),
    (128, dense(257, 300, False), 257, 300),
    (256, dense(130, 150, True), 130, 150),
    (64, window(400, 400, 40, 0, causal=True), 400, 400),
    (32, window(300, 300, 8, 8, num_global=3), 300, 300),
    (320, dense(40, 70, True), 40, 70),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=["d64", "d128", "d256", "window", "global", "simt_d320"])
def test_dropout_matches_reference(case, deterministic):
    D, spec, Nq, Nk = case
    q, k, v = make(2, 4, 2, Nq, Nk, D)
    check(q, k, v, with_dropout(spec, 0.2, 2, 4, Nq, Nk), deterministic=deterministic)


def keep_read_back(device, dtype, B, H, Nq, Nk, p, **kw):
    """The kernel's keep decisions, read back: uniform probabilities (q = 0) over an
    identity V give out[i, j] = keep_ij / (Nk (1 - p)) (exact enough in 16 bits to round)."""
    q = torch.zeros(B, H, Nq, 8, device=device, dtype=dtype)
    k = torch.randn(B, H, Nk, 8).to(device, dtype)
    v = torch.eye(Nk).expand(B, H, Nk, Nk).to(device, dtype).contiguous()
    out, _ = torch.ops.attention_ext.attention_fwd(q, k, v, scale=1.0, dropout_p=p, dropout_seed=SEED.to(device), **kw)
    scaled = out.float().cpu() * Nk * (1 - p)
    assert torch.allclose(scaled, scaled.round(), atol=0.05)
    return scaled.round().bool()


# Nk keys = the value dim: the tensor-core buckets 64, 128, 256 (bf16) and the SIMT path (fp32)
@pytest.mark.parametrize("dtype,Nk", [(torch.bfloat16, 64), (torch.bfloat16, 120), (torch.bfloat16, 200),
                                      (torch.float32, 200)], ids=["tc64", "tc128", "tc256", "simt"])
def test_dropout_keeps_what_the_cpu_keeps(dtype, Nk):
    B, H, Nq, p = 2, 3, 150, 0.3
    cuda = keep_read_back(DEV, dtype, B, H, Nq, Nk, p)
    cpu = keep_read_back("cpu", torch.float32, B, H, Nq, Nk, p)
    assert torch.equal(cuda, cpu)
    assert torch.equal(cuda, R.dropout_keep(SEED, p, B, H, Nq, Nk))


def test_dropout_float64_matches_the_cpu():
    # float64 (SIMT) forward and backward against the CPU kernels: any keep decision of
    # either backward kernel that differed would show far above this tolerance
    q, k, v = make(1, 4, 2, 190, 210, 64)
    spec = with_dropout(dense(190, 210, True), 0.25, 1, 4, 190, 210)
    g = bf16_exact(1, 4, 190, 64)
    outs = {}
    for dev in (DEV, "cpu"):
        at = AttentionSpec(scale=0.125, **{n: x.to(dev) if torch.is_tensor(x) else x for n, x in spec.fields.items()})
        qd, kd, vd, gd = (t.to(dev) for t in (q, k, v, g))
        out, lse = at.forward(qd, kd, vd)
        outs[dev] = (out, lse) + tuple(at.backward(gd, None, qd, kd, vd, out, lse)[:3])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), outs[DEV], outs["cpu"]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, msg=name)


def test_dropout_repeats_bitwise_and_p_zero_is_no_dropout():
    q, k, v = (t.to(DEV, torch.bfloat16) for t in make(1, 4, 2, 200, 200, 64))
    g = torch.randn(1, 4, 200, 64, device=DEV, dtype=torch.bfloat16)
    runs = []
    for p in (0.1, 0.1, 0.0):
        spec = AttentionSpec(scale=0.125, causal=True, dropout_p=p, dropout_seed=SEED.to(DEV) if p else None)
        out, lse = spec.forward(q, k, v)
        runs.append((out, lse) + tuple(spec.backward(g, None, q, k, v, out, lse)[:3]))
    plain = AttentionSpec(scale=0.125, causal=True)
    out, lse = plain.forward(q, k, v)
    runs.append((out, lse) + tuple(plain.backward(g, None, q, k, v, out, lse)[:3]))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])
    for a, b in zip(runs[2], runs[3]):
        assert torch.equal(a, b)
