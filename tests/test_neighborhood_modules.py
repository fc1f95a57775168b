"""attention_ext.nn.NeighborhoodAttention1D/2D/3D: NATTEN's module interface on our
neighborhood_attention, against the same layer written out with the float64 reference."""

import math

import pytest
import torch

import attention_ext.nn as aenn
import reference as R

MODULES = [
    (aenn.NeighborhoodAttention1D, (23,), dict(kernel_size=6, dilation=2, stride=2, is_causal=True)),
    (aenn.NeighborhoodAttention2D, (12, 10), dict(kernel_size=(5, 4), dilation=(2, 1), stride=(1, 2))),
    (aenn.NeighborhoodAttention3D, (4, 6, 5), dict(kernel_size=3, is_causal=(True, False, False))),
]


def reference_layer(m, x, ks, dil, st, causal):
    B, *spatial, C = x.shape
    N, H = math.prod(spatial), m.num_heads
    qkv = m.qkv(x.double()).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    out, _ = R.attention(qkv[0], qkv[1], qkv[2], R.natten_mask(tuple(spatial), ks, dil, st, causal), scale=m.scale)
    return m.proj(out.transpose(1, 2).reshape(B, *spatial, C))


@pytest.mark.parametrize("case", MODULES, ids=lambda c: c[0].__name__)
def test_module_matches_reference(case):
    cls, spatial, kw = case
    m = cls(32, 4, **kw)
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}  # NATTEN's names
    x = torch.randn(2, *spatial, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    ref = reference_layer(m.double(), x.detach().double().requires_grad_(), m.kernel_size, m.dilation, m.stride,
                          m.is_causal)
    m.float()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


def test_module_arguments():
    m = aenn.NeighborhoodAttention2D(16, 2, 3, qkv_bias=False)
    assert m.qkv.bias is None and m.kernel_size == (3, 3) and m.is_causal == (False, False)
    assert "kernel_size=(3, 3)" in repr(m)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide dim \(16\)"):
        aenn.NeighborhoodAttention2D(16, 3, 3)
    with pytest.raises(ValueError, match="kernel_size must be an int or a tuple of 3"):
        aenn.NeighborhoodAttention3D(16, 2, (3, 3))
    with pytest.raises(ValueError, match=r"x must be \(batch, 2 spatial dims, dim=16\)"):
        m(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match=r"kernel_size\[1\] = 3 exceeds the extent 2"):
        m(torch.randn(1, 8, 2, 16))
