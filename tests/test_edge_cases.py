"""Edge cases found in review: autocast through the `torch` backend, damaged checkpoint
pointers, the synthetic exporter's refusals, empty/degenerate shapes on the reference backend,
bad construction arguments, and meta tensors."""
from __future__ import annotations

import json

import pytest
import torch

from regharm_ext import harmonize as hz
from regharm_ext.backends import unavailable_reason
from regharm_ext.checkpoint import CheckpointError, load_model, resolve_checkpoint
from regharm_ext.evaluate import main as evaluate_main
from regharm_ext.layers import LTL, PTL
from regharm_ext.ops import masked_attention, patch_stats

CPU_BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(unavailable_reason(n, "cpu") is not None,
                                                         reason=f"{n} unavailable on this machine"))
                for n in ("reference", "torch", "native")]


# --------------------------------------------------------------------------- autocast
def _attention_inputs(B=2, L=16, N=12, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, D, generator=g)
    k = torch.randn(B, N, D, generator=g)
    kb = torch.zeros(B, N)
    kb[0, :3] = float("-inf")
    qm = torch.rand(B, L, generator=g) > 0.4
    return q, k, k.clone(), kb, qm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_attention_under_autocast_keeps_q_dtype(backend, dtype):
    # autocast lowers SDPA inside the `torch` backend; its scatter into a float32 buffer failed
    q, k, v, kb, qm = _attention_inputs()
    want = masked_attention(q, k, v, kb, qm, backend="reference")
    with torch.autocast("cpu", dtype=dtype):
        for mask in (qm, None):
            out = masked_attention(q, k, v, kb, mask, backend=backend)
            assert out.dtype == torch.float32
            if mask is not None:
                torch.testing.assert_close(out, want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layer", ["PTL", "LTL"])
def test_layers_under_bf16_autocast_match_reference(layer, backend):
    torch.manual_seed(0)
    make = (lambda b: PTL(8, patch=4, stride=2, backend=b)) if layer == "PTL" else (lambda b: LTL(8, backend=b))
    ref = make("reference")
    mod = make(backend)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 16, 16)
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, 4:11, 3:12] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, out = ref(x, m), mod(x, m)
        out.float().sum().backward()
    assert out.dtype == want.dtype
    torch.testing.assert_close(out.float(), want.float(), atol=6e-2, rtol=6e-2)


# --------------------------------------------------------------------------- checkpoint pointers
@pytest.mark.parametrize("pointer", [{}, [1], {"checkpoint": 5}, {"checkpoint": ""}, "x"],
                         ids=["empty", "list", "int", "blank", "string"])
def test_wrong_pointer_is_a_checkpoint_error(tmp_path, pointer):
    (tmp_path / "latest.json").write_text(json.dumps(pointer))
    for call in (lambda: resolve_checkpoint(tmp_path), lambda: load_model(tmp_path)):
        with pytest.raises(CheckpointError, match="latest.json is not a checkpoint pointer.*delete it"):
            call()


def test_wrong_pointer_is_one_line_in_the_clis(tmp_path, capsys):
    from PIL import Image
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.json").write_text("[1]")
    img, mask = tmp_path / "c.png", tmp_path / "m.png"
    Image.new("RGB", (64, 64)).save(img)
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (16, 16, 48, 48))
    half.save(mask)
    calls = (lambda: hz.main(["--image", str(img), "--mask", str(mask), "--out", str(tmp_path / "o.png"),
                              "--checkpoint", str(run)]),
             lambda: evaluate_main(["--val-length", "2", "--no-progress", "--checkpoint", str(run)]))
    for call in calls:
        assert call() == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is not a checkpoint pointer" in err, err


# --------------------------------------------------------------------------- synthetic exporter
def _synth(argv, capsys):
    from regharm_ext.data.synth import main as synth_main
    rc = synth_main(argv)
    return rc, capsys.readouterr().err.strip()


def test_synth_export_keeps_an_existing_root_lists_unless_forced(tmp_path, capsys):
    root = tmp_path / "iHarmony4"
    root.mkdir()
    lists = {f"IHD_{s}.txt": f"HCOCO/composite_images/c{s}_1_1.jpg\n" for s in ("train", "test")}
    for name, text in lists.items():
        (root / name).write_text(text)
    rc, err = _synth(["--out", str(root), "--n", "1", "--n-train", "0", "--size", "16"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--force" in err and "IHD_" in err, err
    assert {p.name for p in root.iterdir()} == set(lists)            # nothing written
    assert all((root / n).read_text() == t for n, t in lists.items())
    rc, _ = _synth(["--out", str(root), "--n", "1", "--n-train", "0", "--size", "16", "--force"], capsys)
    assert rc == 0 and (root / "IHD_test.txt").read_text() == "Synthetic/composite_images/v00000_1_1.jpg\n"
    # a forced export of another subset leaves Synthetic alone, and says a loader still finds it
    rc, err = _synth(["--out", str(root), "--n", "1", "--n-train", "0", "--size", "16", "--force",
                      "--subsets", "Other"], capsys)
    assert rc == 0 and (root / "Synthetic" / "Synthetic_test.txt").is_file()
    assert err.startswith("note: ") and "the subset(s) Synthetic from before" in err, err


@pytest.mark.parametrize("args", [["--size", "0"], ["--size", "-5"], ["--size", "1"], ["--size", "7"],
                                  ["--subsets", "a/b"], ["--subsets", ".."], ["--subsets", "..\\x"],
                                  ["--subsets", "A", "B", "A"]],
                         ids=["size0", "size-5", "size1", "size7", "slash", "dotdot", "backslash", "dupe"])
def test_synth_bad_arguments_are_one_line_and_create_nothing(tmp_path, capsys, args):
    out = tmp_path / "out"
    rc, err = _synth(["--out", str(out), "--n", "1"] + args, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_synth_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc, err = _synth(["--out", str(out), "--n", "1", "--size", "16"], capsys)
        assert rc == 2 and len(err.splitlines()) == 1 and str(f) in err, err
    assert f.read_text() == "x"


# --------------------------------------------------------------------------- degenerate shapes
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patch_stats_and_ptl_on_an_empty_batch(backend):
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    outs = patch_stats(x, torch.rand(0, 1, 8, 8), torch.randn(16), torch.zeros(1), 4, 2, backend=backend)
    assert [tuple(t.shape) for t in outs] == [(0, 9, 3)] * 3 + [(0, 9)]
    y = PTL(3, patch=4, stride=2, backend=backend)(x, torch.rand(0, 1, 8, 8))
    assert y.shape == (0, 3, 8, 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_masked_attention_without_keys_gives_zeros(backend, with_mask):
    q = torch.randn(2, 5, 4, requires_grad=True)
    k = torch.randn(2, 0, 4)
    qm = torch.ones(2, 5, dtype=torch.bool) if with_mask else None
    out = masked_attention(q, k, torch.randn(2, 0, 6), torch.zeros(2, 0), qm, backend=backend)
    assert out.shape == (2, 5, 6) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_masked_attention_on_an_empty_batch(backend, with_mask):
    q = torch.randn(0, 5, 4, requires_grad=True)
    qm = torch.ones(0, 5, dtype=torch.bool) if with_mask else None
    out = masked_attention(q, torch.randn(0, 7, 4), torch.randn(0, 7, 6), torch.zeros(0, 7), qm,
                           backend=backend)
    assert out.shape == (0, 5, 6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("x_dtype,mask_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                (torch.float32, torch.bfloat16)], ids=str)
def test_patch_stats_casts_bg_and_weight_to_x_precision(backend, x_dtype, mask_dtype):
    # one rule on every backend: bg/weight/bias of any float dtype, computed in x's precision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 10, generator=g, dtype=x_dtype)
    bg = (torch.rand(2, 1, 12, 10, generator=g) > 0.3).to(mask_dtype)
    w, b = torch.randn(12, generator=g).to(mask_dtype), torch.full((1,), 0.1, dtype=mask_dtype)
    outs = patch_stats(x, bg, w, b, (4, 3), 2, backend=backend)
    want = patch_stats(x, bg.to(x_dtype), w.to(x_dtype), b.to(x_dtype), (4, 3), 2, backend="reference")
    for o, r in zip(outs, want):
        assert o.dtype == x_dtype
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- construction arguments
@pytest.mark.parametrize("make,words", [
    (lambda: PTL(8, patch=0), "patch must be >= 1"),
    (lambda: PTL(8, stride=(2, 0)), "stride must be >= 1"),
    (lambda: PTL(8, patch=1.5), "patch as a fraction"),
    (lambda: PTL(0), "PTL channels must be an int >= 1"),
    (lambda: LTL(0), "LTL channels must be an int >= 1"),
    (lambda: masked_attention(torch.randn(1, 2, 0), torch.randn(1, 3, 0), torch.randn(1, 3, 4),
                              torch.zeros(1, 3)), r"D >= 1"),
], ids=["patch0", "stride0", "patch1.5", "ptl0", "ltl0", "attnD0"])
def test_bad_construction_arguments_are_value_errors(make, words):
    with pytest.raises(ValueError, match=words):
        make()


# --------------------------------------------------------------------------- meta / fake tensors
@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("layer", ["PTL", "LTL"])
def test_layers_propagate_shapes_on_meta_and_fake_tensors(layer, backend):
    # the `torch` backend read the active-query count (.item()), which such tensors do not hold
    from torch._subclasses.fake_tensor import FakeTensorMode
    make = (lambda: PTL(8, patch=4, stride=2, backend=backend)) if layer == "PTL" else (lambda: LTL(8, backend=backend))
    out = make().to("meta")(torch.randn(2, 8, 16, 16, device="meta"), torch.rand(2, 1, 16, 16, device="meta"))
    assert out.shape == (2, 8, 16, 16) and out.is_meta
    mod, x, m = make(), torch.randn(2, 8, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert mod(x, m).shape == (2, 8, 16, 16)
