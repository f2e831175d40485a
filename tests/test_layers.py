"""PTL and LTL (SPEC §4): sizes, pass-through cases, and agreement across backends."""
import pytest
import torch

from regharm_ext import LTL, PTL, masked_instance_norm
from regharm_ext.backends import unavailable_reason
from helpers import assert_close

BACKENDS = ["reference"] + [n for n in ("torch", "native") if unavailable_reason(n, "cpu") is None]


def _inputs(B=2, C=8, H=24, W=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    mask = torch.zeros(B, 1, 2 * H, 2 * W)  # masks may come at image size: layers resize them
    mask[0, :, 10:30, 8:24] = 1.0
    mask[1, :, 4:20, 20:36] = torch.rand(16, 16, generator=g)  # soft foreground
    return x, mask


def test_ptl_default_sizes_follow_the_paper():
    ptl = PTL(64)
    assert ptl.patch_size(128, 128) == (16, 16) and ptl.stride_size(128, 128) == (4, 4)
    assert isinstance(ptl.weight, torch.nn.UninitializedParameter)  # fractional patch: sized at the first forward
    x = torch.randn(1, 64, 128, 128)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 40:80, 50:90] = 1
    ptl(x, mask)
    assert ptl.weight.shape == (256,)
    built = PTL(64, feature_size=(128, 128))
    assert built.weight.shape == (256,) and PTL(64, patch=(16, 8)).weight.shape == (128,)


@pytest.mark.parametrize("layer", ["ptl", "ltl"])
def test_layers_agree_across_backends(layer):
    x, mask = _inputs()
    torch.manual_seed(0)
    mod = PTL(8, patch=(5, 4), stride=(3, 2)) if layer == "ptl" else LTL(8)
    outs, grads = {}, {}
    for name in BACKENDS:
        mod.backend = name
        xi = x.clone().requires_grad_(True)
        mod.zero_grad()
        out = mod(xi, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[name] = out.detach()
        grads[name] = [xi.grad] + [p.grad.clone() for p in mod.parameters()]
    for name in BACKENDS[1:]:
        assert_close(outs[name], outs["reference"], torch.float32, msg=name)
        for a, e in zip(grads[name], grads["reference"]):
            assert_close(a, e, torch.float32, grad=True, msg=name)


@pytest.mark.parametrize("layer", ["ptl", "ltl"])
def test_background_is_kept_where_mask_is_zero(layer):
    x, mask = _inputs()
    mod = PTL(8, patch=4, stride=2) if layer == "ptl" else LTL(8)
    out = mod(x, mask)
    m = torch.nn.functional.interpolate(mask, size=x.shape[-2:], mode="area")
    ref = x if layer == "ptl" else torch.nn.functional.instance_norm(x + mod.attn(x))
    keep = (m == 0).expand_as(x)
    assert torch.equal(out[keep], ref[keep])
    assert not torch.allclose(out[~keep], ref[~keep])


def test_ptl_passes_through_without_foreground_or_background():
    x, _ = _inputs()
    ptl = PTL(8, patch=4, stride=2)
    assert torch.equal(ptl(x, torch.zeros(2, 1, 24, 20)), x)
    assert torch.equal(ptl(x, torch.ones(2, 1, 24, 20)), x)
    xr = x.clone().requires_grad_(True)
    ptl(xr, torch.ones(2, 1, 24, 20)).sum().backward()
    assert torch.isfinite(xr.grad).all() and torch.isfinite(ptl.weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ptl_keeps_the_ops_verdict_on_a_mass_that_rounds_up_to_min_mass(backend, dtype):
    """A patch whose float32 mass is a hair under min_mass is invalid (SPEC §2); its mass, rounded
    to 16 bits, reads min_mass. With no other valid patch the image passes through unchanged."""
    ulp = float(torch.finfo(dtype).eps)   # the step of both dtypes in [1, 2)
    # two 2x2 patches: the left all foreground, the right with background 3 x 0.5 + (0.5 - ulp/2)
    m = torch.tensor([[1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5 + ulp / 2]]).view(1, 1, 2, 4).to(dtype)
    x = torch.randn(1, 3, 2, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    ptl = PTL(3, patch=2, stride=2, min_mass=2.0, backend=backend).to(dtype)
    torch.nn.init.normal_(ptl.weight)
    mass = (1 - m.float()).view(2, 4)[:, 2:].sum()   # the right patch's, as patch_stats sums it
    assert float(mass) < 2.0 and float(mass.to(dtype)) == 2.0   # the case in question
    with torch.no_grad():
        assert torch.equal(ptl(x, m), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_float16_ptl_and_rain_keep_the_background_when_c_f_overflows(backend, grad):
    """A channel ReLU zeroed over the whole foreground and one background value of 210 there:
    C_f = 210 · rstd (316) exceeds float16's 65504 at that pixel, where the output must still be
    x exactly (not 0 · inf = NaN), forward and backward."""
    from regharm_ext.rain import RAIN
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:20, 8:20] = 1
    x = torch.relu(torch.randn(1, 4, 32, 32, generator=g))
    x[:, 0, 8:20, 8:20] = 0
    x[:, 0, 0, 0] = 210.0
    x, m = x.half().requires_grad_(grad), m.half()
    for layer in (PTL(4, backend=backend, feature_size=(32, 32)), RAIN(4)):
        with torch.set_grad_enabled(grad):
            y = layer(x, m)
        bg = (m == 0).expand_as(y)
        assert torch.equal(y[bg], x.detach()[bg]), type(layer).__name__
        if grad:
            (dx,) = torch.autograd.grad(y.float().sum(), x)
            assert torch.isfinite(dx).all(), type(layer).__name__


def _ptl_by_formula(ptl, x, mask):
    """SPEC §4's PTL written out with plain differentiable torch ops (the layer's own blend and
    normalization have hand-written backwards)."""
    import torch.nn.functional as F
    from regharm_ext.ops import masked_attention, patch_stats
    B, C, H, W = x.shape
    m = F.interpolate(mask, size=(H, W), mode="area")
    mu, sigma, content, mass = patch_stats(x, 1 - m, ptl.weight, ptl.bias, ptl.patch_size(H, W),
                                           ptl.stride_size(H, W), ptl.eps, ptl.min_mass,
                                           backend="reference")
    fg = m.sum((2, 3), keepdim=True)
    w = m / torch.where(fg > 0, fg, torch.ones_like(fg))
    mean = (w * x).sum((2, 3), keepdim=True)
    var = (w * (x - mean) ** 2).sum((2, 3), keepdim=True)
    c_f = ((x - mean) / torch.sqrt(var + ptl.eps)).flatten(2).transpose(1, 2)
    valid = mass >= ptl.min_mass
    key_bias = torch.zeros_like(mass).masked_fill(~valid, float("-inf"))
    av = masked_attention(c_f, content, torch.cat([mu, sigma], -1), key_bias,
                          (m > 0).flatten(1), ptl.scale, backend="reference")
    a, v = av[..., :C], av[..., C:]
    t_fb = (c_f * v + a).transpose(1, 2).reshape(B, C, H, W)
    out = (1 - m) * x + m * t_fb
    return torch.where(valid.any(1).view(B, 1, 1, 1), out, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ptl_matches_the_spec_formula_with_its_gradients(backend):
    """Forward and every gradient against autograd of the formula, in float64: a hard and a soft
    foreground and an image without background (passes through)."""
    x, mask = _inputs(B=3)
    mask[2] = 1.0
    x = x.double()
    ptl = PTL(8, patch=(5, 4), stride=(3, 2), backend=backend).double()
    torch.nn.init.normal_(ptl.bias)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    results = []
    for fn in (lambda t: ptl(t, mask.double()), lambda t: _ptl_by_formula(ptl, t, mask.double())):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        results.append([out] + list(torch.autograd.grad(out, (xi, ptl.weight, ptl.bias), grad)))
    assert torch.equal(results[0][0][2], x[2])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_ptl_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 7, generator=g)
    m = torch.zeros(2, 1, 8, 7, dtype=torch.float64)
    m[0, :, 1:4, 2:6] = 1.0
    m[1, :, 3:7, 0:3] = torch.rand(4, 3, generator=g, dtype=torch.float64)  # soft
    ptl = PTL(3, patch=4, stride=2, backend="reference").double()

    def fn(t, weight, bias):
        return torch.func.functional_call(ptl, {"weight": weight, "bias": bias}, (t, m))

    params = (ptl.weight.detach().clone(), ptl.bias.detach().clone())
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x.double(),) + params))


def test_ltl_without_background_is_finite():
    x, _ = _inputs()
    ltl = LTL(8)
    xr = x.clone().requires_grad_(True)
    out = ltl(xr, torch.ones(2, 1, 24, 20))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ltl_in_bfloat16_keeps_a_soft_mask_near_one(backend):
    """m = 0.999 everywhere: every key keeps its bias log(1 - m) = -6.9 in bfloat16 too (the
    mask is not rounded to 1 first, which would remove every key and zero T_r)."""
    torch.manual_seed(0)
    x, m = torch.randn(1, 8, 8, 8), torch.full((1, 1, 8, 8), 0.999)
    ltl = LTL(8, backend=backend)
    want = ltl(x, m)
    got = ltl.to(torch.bfloat16)(x.bfloat16(), m).float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_masked_instance_norm_normalizes_the_weighted_region():
    x, mask = _inputs()
    m = torch.nn.functional.interpolate(mask, size=x.shape[-2:], mode="area")
    y = masked_instance_norm(x, m)
    mass = m.sum((2, 3))
    mean = (m * y).sum((2, 3)) / mass
    var = (m * (y - mean[..., None, None]) ** 2).sum((2, 3)) / mass
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


def test_ptl_contribution_is_a_distribution_over_background():
    x, mask = _inputs()
    ptl = PTL(8, patch=4, stride=2)
    cmap = ptl.contribution(x, mask)
    assert cmap.shape == (2, 24, 20)
    torch.testing.assert_close(cmap.sum((1, 2)), torch.ones(2))
    m = torch.nn.functional.interpolate(mask, size=(24, 20), mode="area")[:, 0]
    assert (cmap[m == 1] == 0).all() and (cmap >= 0).all()


def test_layers_reject_wrong_channels_and_sizes():
    with pytest.raises(ValueError, match=r"PTL\(8\) expects x of shape \(B, 8, H, W\)"):
        PTL(8)(torch.zeros(1, 4, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"LTL\(8\) expects"):
        LTL(8)(torch.zeros(1, 8, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="mask must have shape"):
        LTL(8)(torch.zeros(1, 8, 4, 4), torch.zeros(1, 4, 4))
    ptl = PTL(8, feature_size=(32, 32))
    with pytest.raises(ValueError, match="training resolution"):
        ptl(torch.zeros(1, 8, 64, 64), torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize("layer", [PTL, LTL])
def test_layers_take_bool_masks_and_name_bad_ones(layer):
    x, mask = _inputs()
    mask = (mask > 0.5).float()
    mod = layer(8)
    assert torch.equal(mod(x, mask > 0.5), mod(x, mask))          # bool: 0/1 weights
    with pytest.raises(ValueError, match=r"mask holds 1 image\(s\) but x holds 2.*\(2, 1, H, W\)"):
        mod(x, mask[:1])
    with pytest.raises(TypeError, match=r"got torch.uint8; for an 8-bit mask picture use mask.float\(\) / 255"):
        mod(x, (mask * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        mod(x, mask.numpy())


def test_ptl_fractional_weights_train_and_load_before_their_first_forward():
    x, mask = _inputs()
    ptl = PTL(8)   # fractional patch, no feature_size: the weights are sized by the first forward
    opt = torch.optim.SGD(ptl.parameters(), lr=1.0)   # the usual order: optimizer first
    ptl(x, mask).sum().backward()
    before = ptl.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, ptl.weight.detach())
    fresh = PTL(8)
    fresh.load_state_dict(ptl.state_dict())           # sizes the fresh layer's weights
    assert torch.equal(fresh(x, mask), ptl(x, mask))
    blank = PTL(8)
    blank.load_state_dict(PTL(8).state_dict())        # unsized into unsized: stays unsized
    assert isinstance(blank.weight, torch.nn.UninitializedParameter)
    assert "patch=(0.125, 0.125)" in repr(blank)


def _norm_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 7, 5, generator=g, dtype=dtype)
    w = torch.rand(3, 1, 7, 5, generator=g, dtype=dtype)
    w[1] = 0           # no weight at all: mu = var = 0
    w[2, :, :3] = 0    # weights on part of the image only
    return x, w


def test_masked_instance_norm_gradcheck():
    x, w = _norm_inputs()
    assert torch.autograd.gradcheck(lambda t: masked_instance_norm(t, w), (x.requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_instance_norm_backward_matches_autograd_of_the_formula(dtype):
    """The analytic backward (data weights) against autograd of the plain formula, which a
    weight that needs a gradient takes."""
    x, w = (t.to(dtype) for t in _norm_inputs())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = masked_instance_norm(xa, w)
    b = masked_instance_norm(xb, w.clone().requires_grad_())
    grad = torch.randn_like(a)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, xa, grad)[0], torch.autograd.grad(b, xb, grad)[0])


def test_masked_instance_norm_keeps_one_tensor_of_x_size_for_backward():
    """PTL's peak memory: autograd of the plain formula saves x - mu twice (and more)."""
    x, w = _norm_inputs(torch.float32)
    saved = set()

    def pack(t):
        if t.numel() == x.numel():
            saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked_instance_norm(x.requires_grad_(), w)
    assert len(saved) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_instance_norm_compiles_with_eager_gradients(dtype):
    """torch.compile(fullgraph=True) through the autograd.Function (torch 2.11 once got these
    gradients wrong when the output was a no-op .to() of itself)."""
    x, w = (t.to(dtype) for t in _norm_inputs())
    fn = lambda t: masked_instance_norm(t, w) * 2  # noqa: E731
    grads = []
    for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
        xi = x.clone().requires_grad_()
        y = f(xi)
        grads.append(torch.autograd.grad((y.float() * y.detach().float().sin()).sum(), xi)[0])
    torch.testing.assert_close(grads[0], grads[1])
