"""PTL and LTL as drop-in layers on a feature map: which backends run, and what the layers change.

    python python/harmonize_features.py
"""
import time

import torch

import regharm_ext
from regharm_ext import LTL, PTL

print("backends on cpu:", regharm_ext.backends("cpu"))

torch.manual_seed(0)
x = torch.randn(2, 32, 64, 64)
mask = torch.zeros(2, 1, 64, 64)
mask[:, :, 20:44, 16:40] = 1            # about 14 % foreground

for name, layer in (("PTL", PTL(32)), ("LTL", LTL(32))):
    start = time.perf_counter()
    y = layer(x, mask)
    y.square().mean().backward()
    ms = (time.perf_counter() - start) * 1e3
    fg = mask.expand_as(x) > 0
    print(f"{name}: forward+backward {ms:.1f} ms; mean |change| inside the mask "
          f"{(y - x)[fg].abs().mean():.3f}, outside {(y - x)[~fg].abs().mean():.3f}")
