"""GPU timing check of the CUDA attention kernels (run on a GPU machine; elsewhere it says so and skips).

    python -m benchmarks gpu_check --device cuda [--budget 60] [--quick] [--skip-sdpa] [--skip-flex] [--skip-ops]

Times, with CUDA events (best of several runs after warm-up), bf16, H=16, D=128:
  * our attention_fwd and fwd+bwd against F.scaled_dot_product_attention restricted to
    the flash backend (torch.nn.attention.sdpa_kernel), causal and not, N 2k..16k;
  * a causal sliding window of 1024 against compiled FlexAttention with a sliding-window
    block mask, N 8k..64k;
  * every public op through the Python API (autograd included) at one size, fwd and
    fwd+bwd, against a peer where one exists (SDPA flash, FlexAttention with the same mask,
    the chunked PyTorch form of linear attention), plus the deterministic backward.
Prints markdown tables with times, our speed relative to the peer (peer time / our
time, > 1 means we are faster) and TFLOP/s counted over the pairs the mask allows
(fwd 4*D flops per allowed pair, fwd+bwd 3.5x that). A peer that fails is reported,
not fatal. Sections stop early once --budget seconds have passed.
It writes no RESULTS.md section itself: benchmarks/run_gpu.sh puts its tables in the "gpu" one.
"""

import argparse
import math
import time
import traceback

import torch
import torch.nn.functional as F

import attention_ext  # noqa: F401
from attention_ext._spec import AttentionSpec

from . import _util as U


def time_ms(fn, reps=10, warmup=2):
    """Best of `reps` runs, in milliseconds (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b))
    return best


def reps_for(ms_guess):
    return max(3, min(20, int(300 / max(ms_guess, 1e-3))))


def pairs_causal(nq, nk):
    # bottom-right aligned: row i sees keys j <= i + nk - nq
    off = nk - nq
    return sum(max(0, min(nk, i + off + 1)) for i in range(nq))


def pairs_window_causal(n, w):
    return sum(min(i + 1, w + 1) for i in range(n))


def _spec(kind=0, causal=False, left=0, right=0, *, scale):
    return AttentionSpec(scale=scale, mask_kind=kind, causal=causal, window_left=left, window_right=right)


def ours(q, k, v, **kw):
    return torch.ops.attention_ext.attention_fwd(q, k, v, **_spec(**kw).op_kwargs())


def ours_fwd_bwd(q, k, v, g, **kw):
    out, lse = ours(q, k, v, **kw)
    return _spec(**kw).backward(g, None, q, k, v, out, lse)


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def short_error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def sdpa_section(args, t_start, rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, D = 16, 128
    shapes = [(4, 2048), (2, 4096), (1, 8192), (1, 16384)] if not args.quick else [(2, 4096)]
    for B, N in shapes:
        for causal in (False, True):
            if time.time() - t_start > args.budget:
                rows.append(f"| {B} | {N} | {causal} | skipped (budget) | | | | | | |")
                continue
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            g = torch.randn_like(q)
            scale = 1.0 / math.sqrt(D)
            pairs = B * H * (pairs_causal(N, N) if causal else N * N)
            fl_f, fl_fb = 4 * D * pairs, 3.5 * 4 * D * pairs
            qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))

            def sd_f():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def sd_fb():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
                return torch.autograd.grad(out, (qr, kr, vr), g)

            res = {}
            for name, fn in (("ours_f", lambda: ours(q, k, v, causal=causal, scale=scale)),
                             ("ours_fb", lambda: ours_fwd_bwd(q, k, v, g, causal=causal, scale=scale)),
                             ("sdpa_f", sd_f), ("sdpa_fb", sd_fb)):
                try:
                    t0 = time_ms(fn, reps=1, warmup=1)
                    res[name] = time_ms(fn, reps=reps_for(t0), warmup=1)
                except Exception as e:  # noqa: BLE001 - a failing contender is a result
                    res[name] = None
                    print(f"[sdpa B={B} N={N} causal={causal}] {name} failed: {short_error(e)}")
            # sanity: our output against the flash backend's
            err = None
            try:
                err = (ours(q, k, v, causal=causal, scale=scale)[0].float() - sd_f().float()).abs().max().item()
            except Exception as e:  # noqa: BLE001
                print(f"[sdpa B={B} N={N}] comparison failed: {short_error(e)}")

            def ratio(a, b):
                return None if res[a] is None or res[b] is None else res[b] / res[a]

            def tf(name, flops):
                return None if res[name] is None else flops / (res[name] * 1e-3) / 1e12

            rows.append(f"| {B} | {N} | {causal} | {fmt(res['ours_f'])} | {fmt(res['sdpa_f'])} | "
                        f"{fmt(ratio('ours_f', 'sdpa_f'), 2)} | {fmt(tf('ours_f', fl_f), 0)} / "
                        f"{fmt(tf('sdpa_f', fl_f), 0)} | {fmt(res['ours_fb'])} | {fmt(res['sdpa_fb'])} | "
                        f"{fmt(ratio('ours_fb', 'sdpa_fb'), 2)} | {fmt(tf('ours_fb', fl_fb), 0)} / "
                        f"{fmt(tf('sdpa_fb', fl_fb), 0)} | {fmt(err, 4)} |")
            del q, k, v, g, qr, kr, vr
            torch.cuda.empty_cache()


def flex_section(args, t_start, rows):
    H, D, W = 16, 128, 1024
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        rows.append(f"| all | FlexAttention unavailable: {short_error(e)} | | | | | | | |")
        return

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)

    sizes = [8192, 16384, 32768, 65536] if not args.quick else [8192]
    for N in sizes:
        if time.time() - t_start > args.budget:
            rows.append(f"| {N} | skipped (budget) | | | | | | | |")
            continue
        B = 1
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = torch.randn_like(q)
        scale = 1.0 / math.sqrt(D)
        pairs = B * H * pairs_window_causal(N, W)
        fl_f, fl_fb = 4 * D * pairs, 3.5 * 4 * D * pairs
        kw = dict(kind=1, causal=True, left=W, right=0, scale=scale)
        res, flex_err = {}, None
        for name, fn in (("ours_f", lambda: ours(q, k, v, **kw)), ("ours_fb", lambda: ours_fwd_bwd(q, k, v, g, **kw))):
            try:
                t0 = time_ms(fn, reps=1, warmup=1)
                res[name] = time_ms(fn, reps=reps_for(t0), warmup=1)
            except Exception as e:  # noqa: BLE001
                res[name] = None
                print(f"[window N={N}] {name} failed: {short_error(e)}")
        err = None
        try:
            bm = create_block_mask(sliding, None, None, N, N, device="cuda")
            qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))

            def fx_f():
                return flex(q, k, v, block_mask=bm, scale=scale)

            def fx_fb():
                out = flex(qr, kr, vr, block_mask=bm, scale=scale)
                return torch.autograd.grad(out, (qr, kr, vr), g)

            for name, fn in (("flex_f", fx_f), ("flex_fb", fx_fb)):
                t0 = time_ms(fn, reps=1, warmup=1)
                res[name] = time_ms(fn, reps=reps_for(t0), warmup=1)
            err = (ours(q, k, v, **kw)[0].float() - fx_f().float()).abs().max().item()
        except Exception as e:  # noqa: BLE001
            flex_err = short_error(e)
            res.setdefault("flex_f", None)
            res.setdefault("flex_fb", None)
            print(f"[window N={N}] FlexAttention failed: {flex_err}")
            traceback.print_exc(limit=2)

        def ratio(a, b):
            return None if res.get(a) is None or res.get(b) is None else res[b] / res[a]

        def tf(name, flops):
            return None if res.get(name) is None else flops / (res[name] * 1e-3) / 1e12

        note = f" ({flex_err})" if flex_err else ""
        rows.append(f"| {N} | {fmt(res['ours_f'])} | {fmt(res['flex_f'])}{note} | {fmt(ratio('ours_f', 'flex_f'), 2)} | "
                    f"{fmt(tf('ours_f', fl_f), 0)} / {fmt(tf('flex_f', fl_f), 0)} | {fmt(res['ours_fb'])} | "
                    f"{fmt(res['flex_fb'])} | {fmt(ratio('ours_fb', 'flex_fb'), 2)} | "
                    f"{fmt(tf('ours_fb', fl_fb), 0)} / {fmt(tf('flex_fb', fl_fb), 0)} | {fmt(err, 4)} |")
        del q, k, v, g
        torch.cuda.empty_cache()


def ops_section(args, t_start, rows):
    """Each public op at B=1, H=16, N=8192 (linear: N=16384), bf16, through autograd."""
    import attention_ext as ae
    from attention_ext import patterns

    H, D, N = 16, 128, 8192
    dt = torch.bfloat16
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception:  # noqa: BLE001
        flex = None

    def flex_peer(mask_mod, n, heads=None, score_mod=None):
        if flex is None:
            return None
        torch._dynamo.reset()  # a fresh compile per mask (and no recompile-limit fallback to eager)
        # heads=None broadcasts head 0's mask to every head: per-head masks must name H
        bm = create_block_mask(mask_mod, None, heads, n, n, device="cuda")
        return lambda q, k, v: flex(q, k, v, block_mask=bm, score_mod=score_mod)

    def softcap50(score, b, h, qi, ki):
        return 50.0 * torch.tanh(score / 50.0)

    def sdpa_causal(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    layout = patterns.bigbird(N, 64, num_heads=H, seed=0).cuda()
    key_mask = torch.arange(N, device="cuda").view(1, N) >= N // 4  # a quarter of left padding
    W, KS = 1024, 1025

    def nb_mask(b, h, qi, ki):
        start = (qi - KS // 2).clamp(0, N - KS)
        return (ki >= start) & (ki < start + KS)

    def deterministic_flash(q, k, v):
        return ae.flash_attention(q, k, v, causal=True)

    from .bench_linear import torch_chunked

    cases = [
        ("flash_attention causal", lambda q, k, v: ae.flash_attention(q, k, v, causal=True), "SDPA flash", sdpa_causal, N),
        ("flash_attention causal, deterministic bwd", deterministic_flash, None, None, N),
        ("flash_attention causal, key_mask 1/4 padded",
         lambda q, k, v: ae.flash_attention(q, k, v, causal=True, key_mask=key_mask),
         "Flex", lambda: flex_peer(lambda b, h, qi, ki: (qi >= ki) & key_mask[b, ki], N), N),
        ("flash_attention causal softcap 50", lambda q, k, v: ae.flash_attention(q, k, v, causal=True, softcap=50.0),
         "Flex", lambda: flex_peer(lambda b, h, qi, ki: qi >= ki, N, score_mod=softcap50), N),
        ("linear_attention elu causal", lambda q, k, v: ae.linear_attention(q, k, v, causal=True),
         "chunked PyTorch", torch_chunked, 16384),
        ("sliding_window 1024 causal", lambda q, k, v: ae.sliding_window_attention(q, k, v, W, causal=True),
         "Flex", lambda: flex_peer(lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= W), N), N),
        ("sliding_window 512 dilation 2", lambda q, k, v: ae.sliding_window_attention(q, k, v, 512, dilation=2),
         "Flex", lambda: flex_peer(lambda b, h, qi, ki: ((qi - ki).abs() <= 1024) & ((qi - ki) % 2 == 0), N), N),
        ("sliding_window 512 + 64 global", lambda q, k, v: ae.sliding_window_attention(q, k, v, 512, global_tokens=64),
         "Flex", lambda: flex_peer(lambda b, h, qi, ki: ((qi - ki).abs() <= 512) | (qi < 64) | (ki < 64), N), N),
        ("neighborhood 1025", lambda q, k, v: ae.neighborhood_attention(q, k, v, KS), "Flex", lambda: flex_peer(nb_mask, N), N),
        ("block_sparse bigbird bs64", lambda q, k, v: ae.block_sparse_attention(q, k, v, layout, block_size=64),
         "Flex", lambda: flex_peer(lambda b, h, qi, ki: layout[h, qi // 64, ki // 64], N, H), N),
    ]
    for name, ours_fn, peer_name, peer, n in cases:
        if time.time() - t_start > args.budget:
            rows.append(f"| {name} | skipped (budget) | | | | | | | |")
            continue
        if callable(peer) and peer_name == "Flex":
            try:
                peer = peer()
            except Exception as e:  # noqa: BLE001
                print(f"[ops {name}] Flex block mask failed: {short_error(e)}")
                peer = None
        q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=dt) for _ in range(3))
        g = torch.randn_like(q)
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        det = "deterministic" in name

        def fwd(fn):
            return lambda: fn(q, k, v)

        def fwd_bwd(fn):
            def run():
                out = fn(qr, kr, vr)
                return torch.autograd.grad(out, (qr, kr, vr), g)
            return run

        res = {}
        pairs = [("ours_f", fwd(ours_fn)), ("ours_fb", fwd_bwd(ours_fn))]
        if peer is not None:
            pairs += [("peer_f", fwd(peer)), ("peer_fb", fwd_bwd(peer))]
        for key, fn in pairs:
            try:
                torch.use_deterministic_algorithms(det and key.startswith("ours"))
                t0 = time_ms(fn, reps=1, warmup=1)
                res[key] = time_ms(fn, reps=reps_for(t0), warmup=1)
            except Exception as e:  # noqa: BLE001
                res[key] = None
                print(f"[ops {name}] {key} failed: {short_error(e)}")
            finally:
                torch.use_deterministic_algorithms(False)
        err = None
        if peer is not None:
            try:
                err = (ours_fn(q, k, v).float() - peer(q, k, v).float()).abs().max().item()
            except Exception as e:  # noqa: BLE001
                print(f"[ops {name}] comparison failed: {short_error(e)}")

        def ratio(a, b):
            return None if res.get(a) is None or res.get(b) is None else res[b] / res[a]

        rows.append(f"| {name} | {n} | {fmt(res.get('ours_f'))} | {fmt(res.get('ours_fb'))} | {peer_name or ''} | "
                    f"{fmt(res.get('peer_f'))} | {fmt(res.get('peer_fb'))} | {fmt(ratio('ours_f', 'peer_f'), 2)} | "
                    f"{fmt(ratio('ours_fb', 'peer_fb'), 2)} | {fmt(err, 4)} |")
        del q, k, v, g, qr, kr, vr
        torch.cuda.empty_cache()

    # one decoding step of linear attention (B=16 sequences), against the same math in PyTorch
    B, Dl = 16, 128
    q, k, v = (torch.randn(B, H, 1, Dl, device="cuda", dtype=dt) for _ in range(3))
    state = (torch.randn(B, H, Dl, Dl, device="cuda").abs(), torch.randn(B, H, Dl, device="cuda").abs())

    def torch_step():
        fq, fk = F.elu(q.float()) + 1, F.elu(k.float()) + 1
        S = state[0] + fk.transpose(-1, -2) @ v.float()
        z = state[1] + fk[:, :, 0]
        return (fq @ S) / ((fq[:, :, 0] * z).sum(-1)[..., None, None] + 1e-6), (S, z)

    try:
        t_o = time_ms(lambda: ae.linear_attention_step(q, k, v, state), reps=50, warmup=5)
        t_p = time_ms(torch_step, reps=50, warmup=5)
        err = (ae.linear_attention_step(q, k, v, state)[0].float() - torch_step()[0]).abs().max().item()
        rows.append(f"| linear_attention_step (B=16, 1 token) | 1 | {fmt(t_o)} | | PyTorch | {fmt(t_p)} | | "
                    f"{fmt(t_p / t_o, 2)} | | {fmt(err, 4)} |")
    except Exception as e:  # noqa: BLE001
        rows.append(f"| linear_attention_step | failed: {short_error(e)} | | | | | | | | |")


def main(args, rest):
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per section before skipping sizes")
    ap.add_argument("--skip-sdpa", action="store_true")
    ap.add_argument("--skip-flex", action="store_true")
    ap.add_argument("--skip-ops", action="store_true")
    opts = ap.parse_args(rest)
    opts.quick = args.quick  # --quick: one size per section
    # `python -m benchmarks all` runs every suite on the CPU: this one then only says why it skips
    if args.device != "cuda":
        print("gpu_check: skipped, it times the CUDA kernels (run it with --device cuda)")
        return
    if not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device here (torch.cuda.is_available() is False)")
        return
    args = opts
    U.raise_recompile_limit()  # every size and mask recompiles FlexAttention
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuda_built={attention_ext._C.cuda_built}")
    sdpa_rows, flex_rows, ops_rows = [], [], []
    for skip, section, rows in ((args.skip_sdpa, sdpa_section, sdpa_rows), (args.skip_flex, flex_section, flex_rows),
                                (args.skip_ops, ops_section, ops_rows)):
        if skip:
            continue
        try:
            section(args, time.time(), rows)
        except Exception as e:  # noqa: BLE001 - a failing section is a result
            rows.append(f"| section failed: {short_error(e)} |")
            traceback.print_exc()
    tables = [
        (sdpa_rows, "bf16, H=16, D=128: ours vs SDPA flash backend (times in ms; speed = SDPA time / ours)",
         "B | N | causal | ours fwd | sdpa fwd | speed fwd | TFLOP/s fwd ours / sdpa | ours fwd+bwd | sdpa fwd+bwd | "
         "speed fwd+bwd | TFLOP/s fwd+bwd ours / sdpa | max abs diff"),
        (flex_rows, "bf16, B=1, H=16, D=128, causal sliding window 1024: ours vs compiled FlexAttention "
         "(times in ms; speed = Flex time / ours)",
         "N | ours fwd | flex fwd | speed fwd | TFLOP/s fwd ours / flex | ours fwd+bwd | flex fwd+bwd | "
         "speed fwd+bwd | TFLOP/s fwd+bwd ours / flex | max abs diff"),
        (ops_rows, "Every op, bf16, B=1, H=16, D=128, through autograd (times in ms; speed = peer time / ours)",
         "op | N | ours fwd | ours fwd+bwd | peer | peer fwd | peer fwd+bwd | speed fwd | speed fwd+bwd | "
         "max abs diff"),
    ]
    for rows, title, columns in tables:
        if rows:
            print(f"\n### {title}\n\n| {columns} |\n|" + "---|" * (columns.count("|") + 1))
            print("\n".join(rows))
