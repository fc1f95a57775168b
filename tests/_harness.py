"""Glue between our functions and the float64 reference: build inputs, run forward and
backward on both, compare with the dtype rules of reference.check_close."""

import torch

import reference as R

LOWP = (torch.float16, torch.bfloat16)


def make_qkv(B, Hq, Hkv, Nq, Nk, D, *, Dv=None, dtype=torch.float32, device="cpu", scale_inputs=1.0):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64) * scale_inputs
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64) * scale_inputs
    v = torch.randn(B, Hkv, Nk, Dv, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))


def check_attention(fn, q, k, v, mask, *, scale=None, softcap=None, bias=None, sinks=None, grads=True,
                    fp32_grad_rel=1e-4, dropout=None):
    """fn(q, k, v) -> (out, lse). Compares out, lse and (optionally) dq/dk/dv with the
    float64 reference under `mask` (bool, broadcast to (B, Hq, Nq, Nk)), `softcap`, an
    additive `bias` (after the cap) and `sinks` (the tensor fn uses: its gradient is
    compared too when it requires grad)."""
    dtype = q.dtype
    out, lse = fn(q, k, v)
    # float64 CPU leaves, so the reference gradients are float64 too
    q64, k64, v64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    s64 = None if sinks is None else sinks.detach().to("cpu", torch.float64).requires_grad_()
    ref_out, ref_lse = R.attention(q64, k64, v64, mask, scale=scale, softcap=softcap, bias=bias, sinks=s64,
                                   dropout=dropout)
    assert out.shape == ref_out.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == ref_lse.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    sl = None if sinks is None else sinks.detach().to(dtype).requires_grad_()
    lowp_out = (R.attention_lowp(ql, kl, vl, mask, scale=scale, softcap=softcap, bias=bias, sinks=sl,
                                    dropout=dropout)
                if dtype in LOWP else None)
    R.check_close(out, ref_out, lowp=lowp_out, what="out")
    # lse is float32 (float64 for float64 inputs) for every input dtype; -inf where a row
    # sees nothing
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite), "lse must be -inf exactly on rows with no visible key"
    lse_tol = 1e-9 if dtype == torch.float64 else 1e-4
    if finite.any():
        err = (lse.detach().double().cpu()[finite] - ref_lse.detach()[finite]).abs().max().item()
        assert err <= lse_tol * max(1.0, ref_lse.detach()[finite].abs().max().item()), f"lse error {err}"
    assert not torch.isnan(out).any()
    if not grads:
        return out, lse
    g = torch.randn_like(out)
    with_sinks = sinks is not None and sinks.requires_grad
    ours = torch.autograd.grad(out, (q, k, v) + ((sinks,) if with_sinks else ()), g)
    refs = torch.autograd.grad(ref_out, (q64, k64, v64) + ((s64,) if with_sinks else ()), g.double().cpu())
    lowp = (None,) * len(ours)
    if dtype in LOWP:
        lowp = torch.autograd.grad(lowp_out, (ql, kl, vl) + ((sl,) if with_sinks else ()), g)
    for name, o, ref, lp in zip(("dq", "dk", "dv", "dsinks"), ours, refs, lowp):
        assert o.shape == ref.shape and o.dtype == (dtype if name != "dsinks" else sinks.dtype)
        assert not torch.isnan(o).any(), f"{name} has NaN"
        R.check_close(o, ref, lowp=lp, dtype=dtype, what=name, fp32_rel=fp32_grad_rel)
    return out, lse


def opcheck_attention(q, k, v, spec):
    """torch.library.opcheck of attention_fwd and attention_bwd under an AttentionSpec."""
    kw = spec.op_kwargs()
    torch.library.opcheck(torch.ops.attention_ext.attention_fwd.default, (q, k, v), kw)
    q, k, v = (t.detach() for t in (q, k, v))
    # the backward op is not differentiable: no input of its call requires grad (sinks)
    kw = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    out, lse = spec.forward(q, k, v)
    bwd_args = (torch.randn_like(out), None, q, k, v, out.detach(), lse.detach())
    torch.library.opcheck(torch.ops.attention_ext.attention_bwd.default, bwd_args, kw)


def check_compiles(loss_fn, *inputs):
    """loss_fn(*inputs) -> scalar traces with torch.compile(fullgraph=True) through our ops'
    fake kernels and autograd, and gives eager's loss and input gradients."""
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager = loss_fn(*inputs)
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(a, b)


def pattern_cases(n, layout, nq_dense=None):
    """One case per pattern of the kernel family, for self-attention of length n (dense:
    nq_dense queries against n keys): (name, fn(q, k, v, **kw) -> (out, lse), the
    reference mask ((Nq, Nk), (H, Nq, Nk) or None), Nq). kw carries the option under test
    (softcap, key_mask)."""
    import attention_ext as ae

    return [
        ("dense", lambda q, k, v, **kw: ae.flash_attention(q, k, v, return_lse=True, **kw), None, nq_dense or n),
        ("causal", lambda q, k, v, **kw: ae.flash_attention(q, k, v, causal=True, return_lse=True, **kw),
         R.causal_mask(n, n), n),
        ("window_causal",
         lambda q, k, v, **kw: ae.sliding_window_attention(q, k, v, 16, causal=True, return_lse=True, **kw),
         R.window_mask(n, n, 16, 0, causal=True), n),
        ("window_dilated_global",
         lambda q, k, v, **kw: ae.sliding_window_attention(q, k, v, (9, 4), dilation=2, global_tokens=2,
                                                           return_lse=True, **kw),
         R.window_mask(n, n, 9, 4, dilation=2) | R.global_mask_2d(n, n, torch.arange(n) < 2), n),
        ("neighborhood",
         lambda q, k, v, **kw: ae.neighborhood_attention(q, k, v, 7, dilation=2, return_lse=True, **kw),
         R.neighborhood_mask(n, 7, dilation=2), n),
        ("block_sparse",
         lambda q, k, v, **kw: ae.block_sparse_attention(q, k, v, layout, block_size=16, causal=True,
                                                         return_lse=True, **kw),
         R.block_mask(layout, 16, n, n) & R.causal_mask(n, n), n),
    ]


def table_rows(out, header, keep):
    """The rows of the markdown table in a suite's output `out` whose header line starts
    with `| {header}`, as dicts column -> cell text, for the lines where keep(line)."""
    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]

    lines = out.splitlines()
    cols = cells(next(line for line in lines if line.startswith("| " + header)))
    return [dict(zip(cols, cells(line))) for line in lines if keep(line)]
