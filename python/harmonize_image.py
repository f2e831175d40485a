"""Harmonize a composite from Python with the packaged default weights.

    python python/harmonize_image.py comp.jpg mask.png out.png

The network runs at its training resolution; its residual is upsampled and applied at the
image's own resolution inside the mask (the same path as ``python -m regharm_ext.harmonize``).
"""
import sys

import numpy as np
import torch
from PIL import Image

from regharm_ext.checkpoint import load_model
from regharm_ext.inference import harmonize_tensor

image_path, mask_path, out_path = sys.argv[1:4]
model, config = load_model(None)              # a run folder or .safetensors file works too
image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), np.float32) / 255)
mask = torch.from_numpy(np.asarray(Image.open(mask_path).convert("L"), np.float32) / 255)
with torch.no_grad():
    out = harmonize_tensor(model, image.permute(2, 0, 1)[None], mask[None, None])
Image.fromarray((out[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(out_path)
print(f"{config['variant']} model -> {out_path}")
