"""Linear attention: attention_ext.linear_attention vs PyTorch and softmax attention.

Contenders, all in this process, causal, elu+1 features, normalised, eps=1e-6:
  ours      attention_ext.linear_attention (chunked kernel, chunk_size=64)
  chunked   the same chunked algorithm in plain PyTorch (chunk-state cumsum + masked
            intra-chunk matmuls, batched GEMMs, autograd backward): the real peer
  cumsum    the per-token PyTorch form (cumsum of phi(k_j) v_j^T: an N x D x Dv state)
  flash     softmax attention, attention_ext.flash_attention (quadratic in N)
Timings are the best of interleaved rounds; fwd+bwd runs autograd.grad of the output
against a fixed cotangent. Peak memory: see benchmarks/_util.peak_memory_mb. Peers
whose estimated memory or time would be excessive are skipped ("–").

    python -m benchmarks linear [--quick] [--threads 1] [--heads 4] [--sizes 1024,2048,...] [--dims 64,128]
"""

import argparse
import math

import torch
import torch.nn.functional as F

import attention_ext

from . import _memory, _util

EPS = 1e-6
CHUNK = 64
# N and head dims per mode (full: every power of 2 from 1k to 64k, --dims)
SIZES = {"quick": dict(sizes=[1024, 2048], dims=[64], rounds=1, scaling_rounds=1),
         "default": dict(sizes=[1 << e for e in range(10, 14)], dims=[64], rounds=2, scaling_rounds=3),
         "full": dict(sizes=[1 << e for e in range(10, 17)], dims=None, rounds=None, scaling_rounds=None)}


def phi(x):
    return F.elu(x) + 1


def torch_cumsum(q, k, v, causal=True):
    fq, fk = phi(q), phi(k)
    if not causal:
        return _torch_full(fq, fk, v)
    S = torch.einsum("bhnd,bhne->bhnde", fk, v).cumsum(2)
    z = fk.cumsum(2)
    num = torch.einsum("bhnd,bhnde->bhne", fq, S)
    return num / ((fq * z).sum(-1, keepdim=True) + EPS)


def torch_chunked(q, k, v, causal=True, chunk=CHUNK):
    fq, fk = phi(q), phi(k)
    if not causal:
        return _torch_full(fq, fk, v)
    B, H, N, D = q.shape
    nc = N // chunk  # the benchmark's N are multiples of the chunk
    fq, fk, vc = (t.reshape(B, H, nc, chunk, t.shape[-1]) for t in (fq, fk, v))
    kv = fk.transpose(-1, -2) @ vc                        # chunk states (B, H, nc, D, Dv)
    S = kv.cumsum(2) - kv                                 # state before each chunk
    zc = fk.sum(-2)
    z = zc.cumsum(2) - zc
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    A = (fq @ fk.transpose(-1, -2)).masked_fill(~mask, 0.0)
    num = fq @ S + A @ vc
    den = (fq * z.unsqueeze(-2)).sum(-1) + A.sum(-1) + EPS
    return (num / den.unsqueeze(-1)).reshape(B, H, N, -1)


def _torch_full(fq, fk, v):
    S = fk.transpose(-1, -2) @ v
    z = fk.sum(-2)
    return (fq @ S) / ((fq * z.unsqueeze(-2)).sum(-1, keepdim=True) + EPS)


def ours(q, k, v, causal=True):
    return attention_ext.linear_attention(q, k, v, causal=causal, chunk_size=CHUNK)


def flash(q, k, v, causal=True):
    return attention_ext.flash_attention(q, k, v, causal=causal)


CONTENDERS = {"ours": ours, "chunked": torch_chunked, "cumsum": torch_cumsum, "flash": flash}


def _allowed(name, B, H, N, D, device, mem_cap_gb, flash_cap_gflop):
    if name == "cumsum":  # the per-token state, its gradient and the einsum operands
        return 4 * B * H * N * D * D * 4 / 2**30 <= mem_cap_gb
    if name == "flash":  # causal fwd+bwd, about 4.5 * 2 * N^2/2 * D flops per head
        return device == "cuda" or 4.5 * B * H * N * N * D / 1e9 <= flash_cap_gflop
    return True


def _make_inputs(B, H, N, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(N + D)
    q, k, v, go = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) * 0.5 for _ in range(4))
    return q, k, v, go


def run_size(B, H, N, D, device, dtype, rounds, mem_cap_gb, flash_cap_gflop, names):
    q, k, v, go = _make_inputs(B, H, N, D, device, dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    active = [n for n in names if _allowed(n, B, H, N, D, device, mem_cap_gb, flash_cap_gflop)]

    def fwd(fn):
        def call():
            with torch.no_grad():
                fn(q, k, v)
        return call

    def fwd_bwd(fn):
        def call():
            out = fn(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), go)
        return call

    row = {"N": N, "D": D}
    with torch.no_grad():
        ref = ours(q, k, v)
        if "chunked" in active:
            row["max |ours - chunked|"] = (ref.float() - torch_chunked(q, k, v).float()).abs().max().item()
    t_fwd, err_f = _util.interleaved({n: fwd(CONTENDERS[n]) for n in active}, rounds=rounds, device=device)
    t_fb, err_b = _util.interleaved({n: fwd_bwd(CONTENDERS[n]) for n in active}, rounds=rounds, device=device)
    mem = {}
    for n in active:
        if n in err_b:
            continue
        mem[n] = _util.peak_memory_mb(fwd_bwd(CONTENDERS[n]), device)
    for n in names:
        row[f"fwd {n}"] = t_fwd.get(n)
        row[f"fb {n}"] = t_fb.get(n)
        row[f"mem {n}"] = mem.get(n)
    errors = {**err_f, **err_b}
    return row, errors


def view(row, names):
    """A row in the shared columns (times in ms, peers as peer time / ours, memory in MiB):
    the line printed as it finishes and what the plots read."""
    out = {"D": row["D"], "N": row["N"]}
    for mode, tag in (("fwd", "fwd"), ("fb", "f+b")):
        out[f"{tag} ours ms"] = _ms(row[f"{mode} ours"])
        out.update({f"{tag} {n}/ours": _ratio(row[f"{mode} ours"], row[f"{mode} {n}"]) for n in names[1:]})
    out.update({f"mem {n} MiB": row[f"mem {n}"] for n in names})
    return out


def scaling_pass(B, H, sizes, D, device, dtype, rounds):
    """Ours alone at every N, interleaved in the same rounds (so that machine drift hits
    every N alike), best of `rounds`: the basis of t(2N)/t(N)."""
    fwd, fb = {}, {}
    for N in sizes:
        q, k, v, go = _make_inputs(B, H, N, D, device, dtype)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def f(q=q, k=k, v=v):
            with torch.no_grad():
                ours(q, k, v)

        def g(qg=qg, kg=kg, vg=vg, go=go):
            out = ours(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), go)

        fwd[N], fb[N] = f, g
    t_f, _ = _util.interleaved(fwd, rounds=rounds, device=device)
    t_b, _ = _util.interleaved(fb, rounds=rounds, device=device)
    return t_f, t_b


def _ms(x):
    return None if x is None else x * 1e3


def _ratio(a, b):
    return None if a is None or b is None or a == 0 else b / a


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks linear")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sizes", default=None, help="comma-separated N (default 1024..65536, powers of 2)")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scaling-rounds", type=int, default=10, help="rounds of the ours-only scaling pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mem-cap-gb", type=float, default=4.0, help="skip cumsum above this estimated state size")
    p.add_argument("--flash-cap-gflop", type=float, default=400.0, help="skip CPU flash above this fwd+bwd work")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every contender (default: torch's default)")
    p.add_argument("--malloc", default="keep", choices=sorted(_memory.POLICIES),
                   help="the allocator policy (benchmarks/_memory.py): keep (default): freed blocks up to 1 GiB stay "
                        "in the heap; glibc: glibc's dynamic mode at its 32 MiB ceiling")
    opts = p.parse_args(rest)
    heap_kept = args.device == "cpu" and _memory.set_policy(opts.malloc) and opts.malloc == "keep"
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = args.device
    dtype = getattr(torch, opts.dtype)
    size = _util.sized(args, SIZES)
    sizes = size["sizes"]
    dims = size["dims"] or [int(x) for x in opts.dims.split(",")]
    rounds, srounds = size["rounds"] or opts.rounds, size["scaling_rounds"] or opts.scaling_rounds
    if opts.sizes:
        sizes = [int(x) for x in opts.sizes.split(",")]
    names = list(CONTENDERS)
    B, H = opts.batch, opts.heads

    rows, all_errors = [], {}
    for D, N in _util.progress([(D, N) for D in dims for N in sizes], lambda c: f"D={c[0]} N={c[1]}",
                               cost=lambda c: c[0] * c[1] ** 1.5):  # cumsum's N·D² and flash's N²·D between
        row, errors = run_size(B, H, N, D, device, dtype, rounds, opts.mem_cap_gb, opts.flash_cap_gflop, names)
        rows.append(row)
        for n, e in errors.items():
            all_errors[f"{n} N={N} D={D}"] = e
        _util.print_row(view(row, names), errors)

    # scaling pass (ours alone, all N interleaved), then ratios and speedups
    scal = {}
    for D in dims:
        t_f, t_b = scaling_pass(B, H, sizes, D, device, dtype, srounds)
        for N in sizes:
            scal[(D, N)] = {"fwd": t_f[N], "fb": t_b[N]}
        for N in sizes:
            _util.print_row({"scaling pass": "ours alone", "D": D, "N": N, "fwd ours ms": t_f[N] * 1e3,
                             "f+b ours ms": t_b[N] * 1e3})
    by_key = {(r["D"], r["N"]): r for r in rows}
    for r in rows:
        prev = scal.get((r["D"], r["N"] // 2))
        cur = scal[(r["D"], r["N"])]
        for mode in ("fwd", "fb"):
            r[f"{mode} ms"] = _ms(r[f"{mode} ours"])
            for n in names:
                r[f"{mode} {n} ms"] = _ms(r[f"{mode} {n}"])
            r[f"{mode} scal ms"] = _ms(cur[mode])
            r[f"{mode} t(2N)/t(N)"] = _ratio(prev[mode], cur[mode]) if prev else None
            for n in names[1:]:
                r[f"{mode} x{n}"] = _ratio(r[f"{mode} ours"], r[f"{mode} {n}"])

    def mode_table(mode):
        cols = ["D", "N", "ours ms", "chunked ms", "cumsum ms", "flash ms", "ours alone ms", "ours t(2N)/t(N)",
                "vs chunked", "vs cumsum", "vs flash"]
        out = []
        for r in rows:
            out.append({"D": r["D"], "N": r["N"], "ours ms": r[f"{mode} ours ms"], "ours alone ms": r[f"{mode} scal ms"],
                        "chunked ms": r[f"{mode} chunked ms"], "cumsum ms": r[f"{mode} cumsum ms"],
                        "flash ms": r[f"{mode} flash ms"], "ours t(2N)/t(N)": r[f"{mode} t(2N)/t(N)"],
                        "vs chunked": r[f"{mode} xchunked"], "vs cumsum": r[f"{mode} xcumsum"],
                        "vs flash": r[f"{mode} xflash"]})
        return _util.table(out, cols)

    mem_cols = ["D", "N", "ours MiB", "chunked MiB", "cumsum MiB", "flash MiB", "max abs ours-chunked"]
    mem_rows = [{"D": r["D"], "N": r["N"], "ours MiB": r["mem ours"], "chunked MiB": r["mem chunked"],
                 "cumsum MiB": r["mem cumsum"], "flash MiB": r["mem flash"],
                 "max abs ours-chunked": (f"{r['max |ours - chunked|']:.1e}"
                                          if r.get("max |ours - chunked|") is not None else None)}
                for r in rows]

    scal_f = [r["fwd t(2N)/t(N)"] for r in rows if r["fwd t(2N)/t(N)"] is not None]
    scal_b = [r["fb t(2N)/t(N)"] for r in rows if r["fb t(2N)/t(N)"] is not None]
    key = by_key.get((64, 16384))
    summary = []
    if scal_f:
        summary.append(f"- Scaling (ours, causal): t(2N)/t(N) max {max(scal_f):.2f} forward, {max(scal_b):.2f} "
                       f"forward+backward over N = {sizes[0]}..{sizes[-1]} (target <= 2.1).")
    if key:
        def fmt(x):
            return "–" if x is None else f"{x:.1f}x"
        summary.append(f"- N=16384, D=64, causal forward+backward: ours {fmt(key['fb xcumsum'])} faster than the "
                       f"PyTorch per-token cumsum form (target >= 3x), {fmt(key['fb xchunked'])} vs the chunked "
                       f"PyTorch form, {fmt(key['fb xflash'])} vs softmax flash_attention; forward only: "
                       f"{fmt(key['fwd xcumsum'])} / {fmt(key['fwd xchunked'])} / {fmt(key['fwd xflash'])}.")
        m = {n: key[f"mem {n}"] for n in names}
        if m["ours"] is not None:
            summary.append("- Peak memory there (forward+backward): " + ", ".join(
                f"{n} {m[n]:.0f} MiB" for n in names if m[n] is not None) + ".")
    if all_errors:
        summary.append("- Failures: " + "; ".join(f"{k}: {v}" for k, v in all_errors.items()))

    body = _util.header("Linear attention (causal, elu+1, normalised)", _util.command_line())
    body += (f"\nB={B}, H={H}, {opts.dtype}, chunk_size={CHUNK}, device {device}, {torch.get_num_threads()} "
             f"thread(s). Times in ms, best of {rounds} rounds interleaving the contenders at each size; "
             f"`vs X` = t(X) / t(ours) from those rounds (> 1: ours faster). `ours alone` and t(2N)/t(N): a "
             f"separate pass of ours only, every N interleaved in the same {srounds} rounds so that machine drift "
             f"hits all N alike. `–` = skipped (cumsum above {opts.mem_cap_gb:g} GB estimated state, CPU flash above "
             f"{opts.flash_cap_gflop:g} GFLOP of fwd+bwd work) or failed. "
             f"Allocator: {'large freed blocks kept in the heap (`--malloc keep`, every contender alike)' if heap_kept else 'glibc ceiling (`--malloc glibc`)'}: "
             f"with glibc's default every output above 32 MiB is a fresh mmap whose page faults each call pays, "
             f"which alone made t(2N)/t(N) reach 2.4-2.7 between N=16384 and 32768 in a `--malloc glibc` run "
             f"of this same code (the kernels' own time scales as below).\n\n")
    body += "\n".join(summary) + "\n\n"
    body += "### Forward\n\n" + mode_table("fwd") + "\n\n"
    body += "### Forward + backward\n\n" + mode_table("fb") + "\n\n"
    body += ("### Peak memory, forward + backward (MiB above the inputs)\n\n" + _util.table(mem_rows, mem_cols) +
             "\n")
    _util.publish(args, "linear", body, rows=[view(r, names) for r in rows])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run as: python -m benchmarks linear")
