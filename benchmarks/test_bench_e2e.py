"""End to end, the paper's model (``rbase+ltl+ptl``, width 1, 256² input), per backend:

- ``train``: one training step (forward, Eq. 8 loss, backward, Adam with its state already
  allocated) on a batch of 4 at 256²; reported as images per second (on CPU a single step, under
  the memory tracker);
- ``infer256``: inference latency of one 256² image (eval mode, inference_mode);
- ``infer1024``: one 1024² image through the full-resolution path (the network at 256² on the
  bilinearly resized image and mask, its residual upsampled bilinearly to 1024² and composed
  there with the full-resolution mask): ``regharm_ext.inference.harmonize_tensor``, what
  ``harmonize`` runs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import benchlib

try:
    from regharm_ext.losses import fmse_loss
    from regharm_ext.model import Harmonizer, memory_format_for
    _MODEL_ERROR = None
except Exception as exc:  # noqa: BLE001 - the model is another issue's work
    _MODEL_ERROR = f"regharm_ext.model.Harmonizer / losses.fmse_loss not importable: {exc}"

try:
    from regharm_ext.inference import harmonize_tensor
except Exception:  # noqa: BLE001 - same path written out, for trees without inference.py
    def harmonize_tensor(model, image, mask):
        size = model.input_size
        small = F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)
        small_mask = F.interpolate(mask, size, mode="bilinear", align_corners=False, antialias=True)
        raw = model.predict_raw(small, small_mask.clamp(0, 1))
        raw = F.interpolate(raw, tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
        return model.compose(image, raw, mask)

VARIANT, S, TRAIN_B = "rbase+ltl+ptl", 256, 4


def _model(backend, device, layout="auto"):
    if _MODEL_ERROR:
        pytest.skip(_MODEL_ERROR)
    reason = benchlib.backend_skip_reason(backend, device)
    if reason is None and backend == "reference" and device.type == "cpu":
        reason = ("reference is the oracle, not a speed path: the end-to-end CPU runs keep to the fast "
                  "backends to fit the suite's time budget (its layer costs are in the layer tables)")
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    # "auto": the layout train, evaluate and harmonize give the model on this device; "other":
    # the one auto does not pick there, as a comparison
    auto = memory_format_for("auto", device)
    fmt = auto if layout == "auto" else (torch.contiguous_format if auto == torch.channels_last
                                         else torch.channels_last)
    return Harmonizer(VARIANT, width=1, input_size=S, backend=backend).to(device, memory_format=fmt)


def _batch(B, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, size, size, generator=g).to(device)
    target = (image * 0.8 + 0.1).clamp(0, 1)
    mask = benchlib.blob_mask(B, size, 0.2, seed).to(device)
    return image, target, mask


def _info(model, backend, mode, B, size, layout):
    channels_last = model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    return dict(kind="e2e", name="harmonizer", variant=VARIANT, width=1, backend=backend, mode=mode,
                B=B, H=size, W=size, network_input=S, dtype="fp32", params=model.count_parameters(),
                memory_format="channels_last" if channels_last else "contiguous",
                memory_format_is_auto=layout == "auto")


def _train_step(benchmark, device, backend, layout):
    model = _model(backend, device, layout).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    image, target, mask = _batch(TRAIN_B, S, device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fmse_loss(model(image, mask), target, mask)
        loss.backward()
        opt.step()

    # Adam's state is created by a step on zero gradients (a no-op update), so that the measured
    # steps are steady-state ones; on GPU measure() warms up with real steps as well
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    benchmark.group = "e2e train step, batch 4 at 256²"
    info = benchlib.measure(benchmark, step, device, single_cpu_run=True,
                            info=_info(model, backend, "train", TRAIN_B, S, layout))
    benchmark.extra_info["images_per_s"] = TRAIN_B / info["time_s"]


def _inference(benchmark, device, backend, size, layout):
    model = _model(backend, device, layout).eval()
    image, _, mask = _batch(1, size, device)

    @torch.inference_mode()
    def infer():
        harmonize_tensor(model, image, mask)

    benchmark.group = f"e2e inference latency, one {size}² image"
    benchlib.measure(benchmark, infer, device, info=_info(model, backend, f"infer{size}", 1, size, layout))


@pytest.mark.parametrize("backend", benchlib.BACKENDS)
def test_train_step(benchmark, device, backend):
    _train_step(benchmark, device, backend, "auto")


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("backend", benchlib.BACKENDS)
def test_inference(benchmark, device, backend, size):
    _inference(benchmark, device, backend, size, "auto")


# the other layout last: where a time budget cuts the suite short, these are the rows lost
@pytest.mark.parametrize("backend", [b for b in benchlib.BACKENDS if b != "reference"])
def test_train_step_other_layout(benchmark, device, backend):
    _train_step(benchmark, device, backend, "other")


@pytest.mark.parametrize("backend", [b for b in benchlib.BACKENDS if b != "reference"])
def test_inference_other_layout(benchmark, device, backend):
    _inference(benchmark, device, backend, 256, "other")
