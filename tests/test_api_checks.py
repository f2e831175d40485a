"""The public Python API refuses bad input by name (inference, metrics, loss, baselines, the ops'
arguments, the backend switch), and treats the SPEC's data arguments as data on every backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import regharm_ext
from regharm_ext import LTL, PTL, masked_instance_norm, ops
from regharm_ext.backends import unavailable_reason
from regharm_ext.baselines import reinhard
from regharm_ext.inference import harmonize_tensor, predict_raw_at
from regharm_ext.losses import fmse_loss
from regharm_ext.metrics import MetricTable, image_metrics
from regharm_ext.model import Harmonizer

CPU_BACKENDS = [b for b in ("reference", "torch", "native") if unavailable_reason(b, "cpu") is None]


def _image_and_mask(B=1, H=48, W=40):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(B, 3, H, W, generator=g)
    mask = torch.zeros(B, 1, H, W)
    mask[..., H // 5:H * 5 // 8, W // 4:W * 5 // 8] = 1    # 48 x 40: rows 9:30, columns 10:25
    return image, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_data_arguments_get_no_gradient_on_any_backend(backend):
    """bg (patch_stats) and key_bias (masked_attention) are data (SPEC §2, §3): a caller's
    requires_grad does not make any backend differentiate them (reference and torch did)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 6, 6, generator=g, requires_grad=True)
    bg = torch.rand(1, 1, 6, 6, generator=g).requires_grad_()
    mu, sigma, content, _ = ops.patch_stats(x, bg, torch.randn(4, generator=g), torch.zeros(1), 2, 2,
                                            backend=backend)
    (mu.sum() + sigma.sum() + content.sum()).backward()
    assert bg.grad is None and x.grad is not None and x.grad.abs().sum() > 0

    q = torch.randn(1, 3, 4, generator=g, requires_grad=True)
    kv = torch.randn(1, 5, 4, generator=g)
    key_bias = torch.zeros(1, 5, requires_grad=True)
    ops.masked_attention(q, kv, kv, key_bias, backend=backend).square().sum().backward()
    assert key_bias.grad is None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, error, match", [
    ("mask_255", ValueError, r"in \[0, 1\], got values in \[0, 255\]; for a 0..255 mask picture use mask / 255"),
    ("mask_nan", ValueError, "mask holds NaN or infinite values"),
    ("image_uint8", TypeError, r"image must be a float tensor .* use image.float\(\) / 255"),
    ("mask_uint8", TypeError, r"mask must be a float tensor .* mask.float\(\) / 255"),
    ("mask_3d", ValueError, r"mask must have shape \(B, 1, H, W\) = \(1, 1, 48, 40\) .* got \(1, 48, 40\)"),
    ("mask_other_size", ValueError, r"got \(1, 1, 48, 32\)"),
    ("mask_broadcast", ValueError, r"got \(1, 1, 1, 1\)"),
    ("image_3d", ValueError, r"image must have shape \(B, 3, H, W\), got \(3, 48, 40\)"),
    ("image_255", ValueError, r"image must hold colours in \[0, 1\], got values in \[0.0\d+, 25\d\.\d+\]; for 8-bit values use image / 255"),
    ("image_nan", ValueError, "image holds NaN or infinite values"),
])
def test_harmonize_tensor_refuses_bad_input_by_name(bad, error, match):
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4).eval()
    image, mask = _image_and_mask()
    args = {
        "mask_255": (image, mask * 255), "mask_nan": (image, mask * float("nan")),
        "image_uint8": ((image * 255).to(torch.uint8), mask), "mask_uint8": (image, mask.to(torch.uint8)),
        "mask_3d": (image, mask[0]), "mask_other_size": (image, mask[..., :32]),
        "mask_broadcast": (image, mask[..., :1, :1]), "image_3d": (image[0], mask),
        "image_255": (image * 255, mask), "image_nan": (image.index_fill(3, torch.tensor([0]), float("nan")), mask),
    }[bad]
    for fn in (harmonize_tensor, predict_raw_at):
        with pytest.raises(error, match=match):
            fn(model, *args)


def test_harmonize_tensor_runs_in_eval_mode_and_the_models_dtype():
    """A model left in training mode is run in eval mode (its BatchNorm statistics untouched) and
    handed back in training mode; a half or double image runs in the model's float32 and comes
    back in its own dtype, with the float32 image's result."""
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4)
    image, mask = _image_and_mask()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    want = harmonize_tensor(model, image, mask)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert torch.equal(want, harmonize_tensor(model.eval(), image, mask))
    model.train()
    got = harmonize_tensor(model, image.double(), mask.bool())
    assert got.dtype == torch.float64 and torch.allclose(got, want.double(), atol=1e-6)
    assert harmonize_tensor(model, image.half(), mask).dtype == torch.float16


def test_predict_raw_at_runs_in_eval_mode_and_the_models_dtype():
    """As harmonize_tensor: a training-mode model gives each image the result it gets alone (its
    BatchNorm statistics were the batch's) and keeps its statistics; other dtypes run."""
    torch.manual_seed(0)
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    image, mask = _image_and_mask(B=3)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    alone, batch = predict_raw_at(model, image[:1], mask[:1]), predict_raw_at(model, image, mask)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    torch.testing.assert_close(alone, batch[:1], atol=1e-5, rtol=1e-5)
    assert predict_raw_at(model, image.double(), mask).dtype == torch.float64
    assert predict_raw_at(model.bfloat16(), image, mask).dtype == torch.float32


def test_eval_mode_restores_every_submodules_mode():
    """A fine-tuning setup keeps BatchNorm layers in eval mode inside a training model: they stay
    so after inference; a training submodule of an eval model does not update its statistics."""
    import torch.nn as nn
    model = Harmonizer("rbase", input_size=64, base_channels=4).train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.eval()
    image, mask = _image_and_mask()
    harmonize_tensor(model, image, mask)
    assert model.training and not any(m.training for m in norms)
    model.eval()
    model.stem.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    harmonize_tensor(model, image, mask)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items()) and model.stem.training


def test_metrics_and_loss_refuse_8_bit_data_and_bad_arguments():
    image, mask = _image_and_mask(B=2, H=8, W=8)
    u8 = (image * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"pred must be a float tensor .* pred.float\(\) / 255"):
        image_metrics(u8, u8, mask)
    with pytest.raises(TypeError, match="mask must be a float tensor"):
        image_metrics(image, image, mask.to(torch.uint8))
    with pytest.raises(ValueError, match='peak must be "target"'):
        image_metrics(image, image, mask, peak="Target")
    assert image_metrics(image, image * 0.9, mask.bool(), peak=np.float32(255))["psnr"].shape == (2,)
    with pytest.raises(TypeError, match="mask must be a float tensor"):
        fmse_loss(image, image, (mask * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="target must be a float tensor"):
        fmse_loss(image, u8, mask)
    with pytest.raises(ValueError, match=r"output must have shape \(B, 3, H, W\), got \(3, 8, 8\)"):
        fmse_loss(image[0], image[0], mask[0])
    assert fmse_loss(image, image.double(), mask).dtype == torch.float64


def test_metric_table_refuses_a_bad_batch_without_changing_its_state():
    image, mask = _image_and_mask(B=2, H=8, W=8)
    values = image_metrics(image * 0.8, image, mask)
    table = MetricTable()
    table.add(["HCOCO", "HFlickr"], values)
    before = table.summary()
    for subsets, error, match in [("HC", TypeError, "one name per image"),
                                  (["HCOCO"], ValueError, "1 subset name"),
                                  (["All", "HCOCO"], ValueError, '"All" is the total')]:
        with pytest.raises(error, match=match):
            table.add(subsets, values)
    assert table.summary() == before and before["All"]["n"] == 2


def test_reinhard_refuses_integer_and_out_of_range_masks():
    image, mask = _image_and_mask(H=8, W=8)
    with pytest.raises(TypeError, match="mask must be a float tensor"):
        reinhard(image, (mask * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"mask weights must be in \[0, 1\]"):
        reinhard(image, mask * 255)
    with pytest.raises(TypeError, match="image must be a float tensor"):
        reinhard((image * 255).to(torch.uint8), mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, H, W\)"):
        reinhard(image, mask[:, 0])
    assert torch.isfinite(reinhard(image, mask)).all()


def test_backends_names_a_bad_device():
    """`regharm_ext.backends(device)` says what a device is rather than passing torch's error on
    (an int is not tested: torch.device(0) is cuda:0 where torch has CUDA, an error where not)."""
    assert regharm_ext.backends("cpu")["reference"] == "available"
    for device in ("gpu", "cuda:x", [0]):
        with pytest.raises(ValueError, match="is not a device: use 'cpu', 'cuda'"):
            regharm_ext.backends(device)


@pytest.mark.parametrize("layer", [PTL, LTL])
def test_layers_refuse_an_unknown_backend_when_built(layer, monkeypatch):
    with pytest.raises(ValueError, match=r"backend='bogus': unknown backend; choose one of reference"):
        layer(8, backend="bogus")
    monkeypatch.setenv("REGHARM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="REGHARM_BACKEND='nonsense': unknown backend"):
        layer(8)


def test_masked_instance_norm_checks_its_arguments():
    x = torch.randn(2, 3, 6, 6)
    for weight, match in [(torch.ones(1, 1, 6, 6), r"weight must have shape \(B, 1, H, W\) = \(2, 1, 6, 6\)"),
                          (torch.ones(6, 6), r"weight must have shape"),
                          (torch.ones(2, 1, 6, 6, dtype=torch.uint8), "weight must be a floating-point")]:
        with pytest.raises((ValueError, TypeError), match=match):
            masked_instance_norm(x, weight)


def test_op_arguments_numbers_and_sizes():
    x, bg = torch.randn(1, 2, 6, 6), torch.rand(1, 1, 6, 6)
    w, b = torch.randn(4), torch.zeros(1)
    want = ops.patch_stats(x, bg, w, b, 2, 2, backend="reference")
    for size in (np.int64(2), torch.tensor(2), (np.int32(2), 2)):   # integers of any kind
        got = ops.patch_stats(x, bg, w, b, size, size, backend="reference")
        assert all(torch.equal(a, e) for a, e in zip(got, want))
    for size in (2.0, "2", (2, 2.5), True):
        with pytest.raises(TypeError, match="must be an int or a pair of ints"):
            ops.patch_stats(x, bg, w, b, size, 2, backend="reference")
    for kw in (dict(eps=float("inf")), dict(eps="1e-5"), dict(min_mass=float("nan"))):
        with pytest.raises((ValueError, TypeError), match="must be a (finite number|number)"):
            ops.patch_stats(x, bg, w, b, 2, 2, backend="reference", **kw)
    with pytest.raises(ValueError, match="x must have at least one channel"):
        ops.patch_stats(x[:, :0], bg, w, b, 2, 2, backend="reference")
    q = torch.randn(1, 3, 4)
    for scale, error in ((float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(error, match="scale must be a"):
            ops.masked_attention(q, q, q, torch.zeros(1, 3), scale=scale, backend="reference")
    ops.masked_attention(q, q, q, torch.zeros(1, 3), scale=-0.5, backend="reference")  # any finite


def test_layers_check_their_numbers_when_built_and_on_every_path():
    """eps, min_mass, scale and heads are refused at construction; a scale set later is refused
    at the forward on every path (the kernel backends' one-node PTL never calls masked_attention,
    where the ops check it)."""
    for kw, match in ((dict(eps=0.0), "eps must be a finite number > 0"),
                      (dict(min_mass=0.0), "min_mass must be a finite number > 0"),
                      (dict(scale=float("nan")), "scale must be a finite number"),
                      (dict(scale=float("inf")), "scale must be a finite number")):
        with pytest.raises(ValueError, match=match):
            PTL(4, 4, 2, **kw)
    with pytest.raises(ValueError, match="heads must be an int >= 1, got 0"):
        LTL(4, heads=0)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 2:6] = 1
    for backend in ("reference", "torch", "native"):
        if regharm_ext.backends("cpu")[backend] != "available":
            continue
        layer = PTL(4, 4, 2, backend=backend)
        layer.scale = float("nan")
        with pytest.raises(ValueError, match="scale must be a finite number"):
            layer(x, m)    # grad enabled: the one-node path on native
