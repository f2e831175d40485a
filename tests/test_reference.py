"""Pins the `reference` backend to the SPEC with direct float64 loops over patches and queries."""
import math

import pytest
import torch

from regharm_ext.ops import masked_attention, patch_stats
from helpers import make_attention_inputs, make_patch_inputs


def loop_patch_stats(x, bg, weight, bias, patch, stride, eps, min_mass):
    """SPEC §2 word for word, one patch and one channel at a time, in float64."""
    B, C, H, W = x.shape
    (ph, pw), (sh, sw) = patch, stride
    Kh, Kw = (H - ph) // sh + 1, (W - pw) // sw + 1
    mu = torch.zeros(B, Kh * Kw, C, dtype=torch.float64)
    sigma, content = torch.zeros_like(mu), torch.zeros_like(mu)
    mass = torch.zeros(B, Kh * Kw, dtype=torch.float64)
    for b in range(B):
        for i in range(Kh):
            for j in range(Kw):
                n = i * Kw + j
                P = bg[b, 0, i * sh:i * sh + ph, j * sw:j * sw + pw].double().flatten()
                mass[b, n] = P.sum()
                if mass[b, n] < min_mass:
                    continue
                for c in range(C):
                    X = x[b, c, i * sh:i * sh + ph, j * sw:j * sw + pw].double().flatten()
                    m = (P * X).sum() / mass[b, n]
                    s = math.sqrt(float((P * (X - m) ** 2).sum() / mass[b, n]) + eps)
                    mu[b, n, c], sigma[b, n, c] = m, s
                    content[b, n, c] = float(bias) + sum(
                        float(weight[r]) * float(P[r]) * (float(X[r]) - float(m)) / s
                        for r in range(ph * pw))
    return mu, sigma, content, mass


def loop_attention(q, k, v, key_bias, query_mask, scale):
    B, L, _ = q.shape
    out = torch.zeros(B, L, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            if query_mask is not None and not query_mask[b, l]:
                continue
            s = [scale * float(q[b, l].double() @ k[b, n].double()) + float(key_bias[b, n])
                 for n in range(k.shape[1])]
            finite = [t for t in s if t != -math.inf]
            if not finite:
                continue
            top = max(finite)
            e = torch.tensor([math.exp(t - top) if t != -math.inf else 0.0 for t in s],
                             dtype=torch.float64)
            out[b, l] = (e / e.sum()) @ v[b].double()
    return out


@pytest.mark.parametrize("bg_kind", ["soft", "binary", "none", "all"])
@pytest.mark.parametrize("shape", [((1, 2, 9, 11), (4, 3), (2, 3)), ((2, 3, 13, 10), (5, 5), (3, 2))])
def test_reference_patch_stats_matches_loops(shape, bg_kind):
    (B, C, H, W), patch, stride = shape
    x, bg, w, b = make_patch_inputs(B, C, H, W, patch, stride, torch.float64, bg_kind=bg_kind)
    got = patch_stats(x, bg, w, b, patch, stride, backend="reference")
    want = loop_patch_stats(x, bg, w, b, patch, stride, 1e-5, 0.5)
    for name, g, e in zip(("mu", "sigma", "content", "mass"), got, want):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9, msg=name)
    if bg_kind == "none":
        assert all(t.abs().sum() == 0 for t in got[:3])


def test_reference_patch_order_is_row_major():
    # a bright column of background marks patch j=1 of every row: the means say where it lands
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[..., 2:4] = 1.0
    bg = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    mu, *_ = patch_stats(x, bg, torch.ones(4, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                         2, 2, backend="reference")
    assert mu[0, :, 0].tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("with_mask", [True, False])
def test_reference_attention_matches_loops(with_mask):
    q, k, v, kb, qm = make_attention_inputs(B=3, L=9, N=7, D=5, E=4, dtype=torch.float64)
    qm = qm if with_mask else None
    got = masked_attention(q, k, v, kb, qm, scale=0.7, backend="reference")
    torch.testing.assert_close(got, loop_attention(q, k, v, kb, qm, 0.7), atol=1e-12, rtol=1e-10)
    assert (got[-1] == 0).all()  # every key removed in the last image


def test_reference_gradients_are_finite_and_zero_where_spec_says():
    q, k, v, kb, qm = make_attention_inputs(B=2, L=6, N=5, D=4, E=3, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    masked_attention(q, k, v, kb, qm, backend="reference").sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[~qm] == 0).all() and (q.grad[-1] == 0).all()
    x, bg, w, b = make_patch_inputs(1, 2, 12, 12, (4, 4), (4, 4), torch.float64)
    bg[..., :8, :] = 0  # first two rows of patches have no background
    x.requires_grad_(True)
    mu, sigma, content, _ = patch_stats(x, bg, w, b, 4, 4, backend="reference")
    (mu.sum() + sigma.sum() + content.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., :8, :] == 0).all()
