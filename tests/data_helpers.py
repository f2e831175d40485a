"""Builders shared by the data / evaluate / harmonize tests: a tiny iHarmony4 tree and a tiny
checkpoint (a small Harmonizer saved like a real one)."""
from __future__ import annotations

from pathlib import Path

import torch


def export_tree(root: Path, subsets=("HCOCO", "Hday2night"), n=2, n_train=1, size=64) -> Path:
    """An iHarmony4-layout tree written by the synthetic exporter (SPEC §6)."""
    from regharm_ext.data.synth import export
    export(root, n=n, n_train=n_train, subsets=subsets, size=size)
    return root


def tiny_harmonizer(input_size=64, head_std=0.0, seed=0, variant="rbase+ltl+ptl"):
    """A light Harmonizer; ``head_std`` 0 keeps the residual head at zero (output = input)."""
    from regharm_ext.model import Harmonizer
    torch.manual_seed(seed)
    model = Harmonizer(variant, input_size=input_size, base_channels=4)
    if head_std:
        torch.nn.init.normal_(model.head.weight, std=head_std)
        torch.nn.init.normal_(model.head.bias, std=head_std)
    return model.eval()


def tiny_checkpoint(path: Path, **kw) -> Path:
    """``path`` (.safetensors) + its JSON, loadable by ``--checkpoint``."""
    from regharm_ext.checkpoint import save_weights
    return save_weights(path, tiny_harmonizer(**kw))
