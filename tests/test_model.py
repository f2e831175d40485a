"""The generator (SPEC §5): every Table 2 variant, the output equations, sizes and parameter counts."""
import pytest
import torch
import torch.nn.functional as F

from regharm_ext.model import VARIANTS, Harmonizer, parse_variant
from regharm_ext.rain import RAIN
from regharm_ext.losses import fmse_loss


def _batch(B=2, S=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, S, S, generator=g)
    target = (image * 0.8 + 0.1).clamp(0, 1)
    mask = torch.zeros(B, 1, S, S)
    mask[0, :, S // 4:S // 2, S // 4:3 * S // 4] = 1
    mask[1, :, S // 2:, : S // 3] = 1
    mask[1, :, S // 2 - 1, : S // 3] = 0.5            # a soft edge
    return image, mask, target


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_builds_and_trains_one_step(variant):
    torch.manual_seed(0)
    model = Harmonizer(variant, input_size=64, base_channels=4, ltl_levels=(16, 32, 64))
    image, mask, target = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(image, mask)
    assert out.shape == image.shape
    loss = fmse_loss(out, target, mask)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "every parameter gets a finite gradient"
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and torch.isfinite(loss)
    out2 = model(image, mask)
    assert torch.isfinite(out2).all()


def test_parameter_count_width1_in_paper_range():
    counts = {v: Harmonizer(v, input_size=256).count_parameters() for v in VARIANTS}
    for v, n in counts.items():
        print(f"width 1, {v}: {n / 1e6:.2f} M parameters")
    assert all(8e6 <= n <= 11e6 for n in counts.values()), counts
    # residual reconstruction adds no parameters (§3.4); PTL adds only its patch projection
    assert counts["base"] == counts["rbase"]
    assert counts["rbase+ptl"] - counts["rbase"] == 16 * 16 + 1    # 1/8 of 128²: 16² weights + bias


def test_width_multiplier_follows_table5():
    n1 = Harmonizer("rbase+ltl+ptl", width=1, input_size=64).count_parameters()
    n2 = Harmonizer("rbase+ltl+ptl", width=2, input_size=64).count_parameters()
    print(f"width 2: {n2 / 1e6:.2f} M = {n2 / n1:.2f} x width 1 (paper: 37.81 M, 3.99 x)")
    assert 3.8 < n2 / n1 < 4.2


def test_output_equations_and_untouched_background():
    image, mask, _ = _batch()
    raw = torch.rand_like(image)
    base = Harmonizer("base", input_size=64, base_channels=4)
    res = Harmonizer("rbase", input_size=64, base_channels=4)
    torch.testing.assert_close(base.compose(image, raw, mask), image * (1 - mask) + raw * mask)   # Eq. 6
    torch.testing.assert_close(res.compose(image, raw, mask), image + raw * mask)                # Eq. 7
    for model in (base, res):
        model.eval()
        out = model(image, mask)
        torch.testing.assert_close(out, model.compose(image, model.predict_raw(image, mask), mask))
        bg = (mask == 0).expand_as(image)
        assert torch.equal(out[bg], image[bg]), "pixels outside the mask are the input's exactly"
    # the residual head starts at zero: an untrained residual model returns the composite
    assert torch.equal(Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4)(image, mask), image)


def test_compose_at_full_resolution():
    model = Harmonizer("rbase", input_size=64, base_channels=4)
    image = torch.rand(1, 3, 75, 100)
    mask = torch.zeros(1, 1, 75, 100)
    mask[..., 10:40, 20:60] = 1
    raw = torch.rand(1, 3, 75, 100)
    out = model.compose(image, raw, mask)
    assert out.shape == image.shape and torch.equal(out[..., 50:, :], image[..., 50:, :])


def _feature_sizes(model, layers, image, mask):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
             for m in layers]
    model(image, mask)
    for h in hooks:
        h.remove()
    return sorted(seen)


@pytest.mark.parametrize("size", [64, 128])
def test_ltl_levels_are_relative_to_input_size(size):
    image, mask, _ = _batch(2, size)
    model = Harmonizer("rbase+ltl+ptl", input_size=size, base_channels=4, ltl_levels=(16, 32, 64))
    ltl = _feature_sizes(model, list(model.token_layers.values()), image, mask)
    # 16, 32, 64 at a 256² input are S/16, S/8, S/4
    assert ltl == [(size // 16,) * 2, (size // 8,) * 2, (size // 4,) * 2]
    assert _feature_sizes(model, [model.patch_layer], image, mask) == [(size // 2,) * 2]
    default = Harmonizer("rbase+ltl", input_size=size, base_channels=4)
    assert _feature_sizes(default, list(default.token_layers.values()), image, mask) == [(size // 8,) * 2]


def test_ptl_contribution_map():
    image, mask, _ = _batch()
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4).eval()
    cmap = model.ptl_contribution(image, mask)
    assert cmap.shape == (2, 32, 32)
    torch.testing.assert_close(cmap.flatten(1).sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="no PTL"):
        Harmonizer("rbase+ltl", input_size=64, base_channels=4).ptl_contribution(image, mask)


def test_config_rebuilds_the_same_model():
    model = Harmonizer("rbase+ltl+ptl", width=2, ltl_levels=(16, 64), input_size=96, base_channels=3)
    copy = Harmonizer(**model.config)
    assert {k: v.shape for k, v in copy.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert copy.config == model.config


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="start with 'base' or 'rbase'"):
        Harmonizer("ltl+ptl")
    with pytest.raises(ValueError, match="unknown part 'xyz'"):
        Harmonizer("rbase+xyz")
    with pytest.raises(ValueError, match="both 'ltl' and 'sa'"):
        parse_variant("rbase+ltl+sa")
    with pytest.raises(ValueError, match="ltl_levels"):
        Harmonizer("rbase+ltl", ltl_levels=(8,))
    with pytest.raises(ValueError, match="multiples of 32"):
        Harmonizer(input_size=100)
    model = Harmonizer("rbase+ptl", input_size=64, base_channels=4)
    image, mask, _ = _batch()
    with pytest.raises(ValueError, match="input_size"):
        model(torch.rand(1, 3, 96, 96), torch.ones(1, 1, 96, 96))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(image, mask[:, :, :32])
    with pytest.raises(TypeError, match=r"mask must be a float tensor.*got torch.uint8"):
        model(image, (mask * 255).to(torch.uint8))
    with pytest.raises(TypeError, match=r"image must be a float tensor.*got torch.uint8"):
        model((image * 255).to(torch.uint8), mask)
    model.eval()
    assert torch.equal(model(image, mask > 0.5), model(image, (mask > 0.5).float()))
    # at another resolution too (inference resizes the mask first)
    from regharm_ext.inference import harmonize_tensor
    big, big_mask = F.interpolate(image, size=(96, 96)), F.interpolate(mask, size=(96, 96)) > 0.5
    assert torch.equal(harmonize_tensor(model, big, big_mask), harmonize_tensor(model, big, big_mask.float()))
    with pytest.raises(TypeError, match="8-bit mask picture"):
        harmonize_tensor(model, big, big_mask.to(torch.uint8))


def test_rain_moves_foreground_to_background_statistics():
    x = torch.randn(2, 5, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:10, 4:12] = 1
    x = x + 3 * mask                                    # a foreground offset to remove
    out = RAIN(5)(x, mask)
    fg, bg = mask.bool().expand_as(x), (~mask.bool()).expand_as(x)
    for b in range(2):
        f, g = out[b][fg[b]].view(5, -1), x[b][bg[b]].view(5, -1)
        torch.testing.assert_close(f.mean(1), g.mean(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(f.std(1, unbiased=False), g.std(1, unbiased=False), atol=1e-3, rtol=1e-3)
    assert torch.equal(out[bg], x[bg])


def _cpu_backends():
    from regharm_ext.backends import backends
    return [b for b, why in backends("cpu").items() if why == "available" and b != "triton"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_model_gives_the_contiguous_models_results(variant):
    """memory_format_for("auto", "cpu") is channels_last: every layer, PTL and LTL's ops included,
    must give the contiguous model's outputs and gradients (up to float rounding)."""
    from regharm_ext.model import memory_format_for
    assert memory_format_for("auto", "cpu") == torch.channels_last
    for backend in _cpu_backends():
        torch.manual_seed(0)
        flat = Harmonizer(variant, input_size=64, base_channels=4, ltl_levels=(32, 64), backend=backend)
        with torch.no_grad():   # a trained-looking head, so the residual is not zero
            flat.head.weight.normal_(0, 0.1)
        cl = Harmonizer(**flat.config)
        cl.load_state_dict(flat.state_dict())
        cl.to(memory_format=torch.channels_last)
        assert cl.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        seen = []
        for layer in [*cl.token_layers.values(), cl.patch_layer]:
            if layer is not None:
                layer.register_forward_pre_hook(lambda m, args: seen.append(
                    args[0].is_contiguous(memory_format=torch.channels_last)))
        image, mask, target = _batch()
        outs = []
        for model in (flat, cl):
            out = model(image, mask)
            fmse_loss(out, target, mask).backward()
            outs.append((out, {k: p.grad for k, p in model.named_parameters()}))
        assert all(seen) and len(seen) == len(cl.token_layers) + (cl.patch_layer is not None), \
            f"{backend}: the layers saw contiguous features ({seen}): the test would not cover them"
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5, msg=f"{variant} {backend}")
        for k, g in outs[0][1].items():
            torch.testing.assert_close(outs[1][1][k], g, rtol=2e-3, atol=1e-5,
                                       msg=lambda m: f"{variant} {backend} grad {k}: {m}")
        assert outs[1][1]["stem.0.weight"].is_contiguous(memory_format=torch.channels_last)


def test_memory_format_names():
    from regharm_ext.model import memory_format_for
    assert memory_format_for("auto", "cuda") == torch.contiguous_format
    assert memory_format_for("contiguous", "cpu") == torch.contiguous_format
    assert memory_format_for("channels_last", torch.device("cuda", 1)) == torch.channels_last
    with pytest.raises(ValueError, match="memory_format must be one of auto, channels_last, contiguous, got 'nhwc'"):
        memory_format_for("nhwc", "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("size", [64, 80], ids=["model_size", "other_size"])
def test_a_16_bit_model_keeps_the_background_exact(dtype, size):
    """The network runs in its parameters' dtype; the image is composed in its own, so the
    background is the input's to the bit (it was the input rounded to 16 bits), and resizes run
    in float32 (the CPU's antialiasing has no 16-bit kernels)."""
    from regharm_ext.inference import harmonize_tensor
    torch.manual_seed(0)
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    model = model.to(dtype).eval()
    img = torch.randint(0, 256, (1, 3, size, size)) / 255.0
    mask = torch.zeros(1, 1, size, size)
    mask[..., 20:50, 16:40] = 1
    out = harmonize_tensor(model, img, mask)
    bg = (mask == 0).expand_as(img)
    assert out.dtype == torch.float32 and torch.equal(out[bg], img[bg])
    assert not torch.equal(out[~bg], img[~bg])   # the foreground did change


def test_harmonize_array_runs_a_training_mode_model_in_eval_mode():
    import numpy as np
    from regharm_ext.harmonize import contribution_map, harmonize_array
    torch.manual_seed(0)
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    img = np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8)
    mask = np.zeros((80, 72), np.uint8)
    mask[20:50, 10:40] = 255
    running = [b.clone() for b in model.buffers()]
    got = harmonize_array(model.train(), img, mask), contribution_map(model, img, mask)
    assert model.training and all(torch.equal(a, b) for a, b in zip(running, model.buffers()))
    want = harmonize_array(model.eval(), img, mask), contribution_map(model, img, mask)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
