"""The backend switch (NATTEN/xformers style): which implementation runs an op, and why not.

Backends, each a module with ``unavailable(device) -> Optional[str]`` (None when it can run on
that device, else the reason) and the two op implementations:

- ``reference``: readable transcription of the SPEC, the oracle (``ops/reference.py``);
- ``torch``: memory-light PyTorch composite (``ops/torch_impl.py``);
- ``native``: our compiled C++/CUDA ops in ``regharm_ext._C`` (``ops/native.py``);
- ``triton``: Triton kernels (``ops/triton_backend.py``); on CPU tensors only under
  ``TRITON_INTERPRET=1``.

``backend=None`` picks the fastest backend that can run on the tensors' device; the environment
variable ``REGHARM_BACKEND`` overrides that choice (never an explicit ``backend=`` argument).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, Optional, Union

import torch

NAMES = ("reference", "torch", "native", "triton")
_MODULES = {
    "reference": "regharm_ext.ops.reference",
    "torch": "regharm_ext.ops.torch_impl",
    "native": "regharm_ext.ops.native",
    "triton": "regharm_ext.ops.triton_backend",
}
# fastest first; the Triton interpreter is far too slow to be picked by default on CPU
_PREFERENCE = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}
_ENV = "REGHARM_BACKEND"


class BackendUnavailable(RuntimeError):
    """Raised when a requested backend cannot run; the message says why."""


def _module(name: str):
    # an already imported backend is looked up, not imported: torch.compile cannot trace
    # importlib, and this lookup lets it compile the ops with fullgraph=True
    mod = sys.modules.get(_MODULES[name])
    if mod is not None:
        return mod
    if torch.compiler.is_compiling():
        raise BackendUnavailable(
            f"backend {name!r} was first needed inside torch.compile, which cannot import it; "
            f"run `from regharm_ext.backends import preload; preload({name!r})` (or the model "
            f"once) before compiling")
    return importlib.import_module(_MODULES[name])


def preload(backend: Optional[str] = None) -> None:
    """Imports the backend modules an op may pick, so that ``torch.compile`` finds them imported.

    ``backend``: that one; None: ``REGHARM_BACKEND``'s, else on a machine with a GPU the CUDA
    choices up to the first that can run (``triton`` only where ``native`` has no CUDA kernels).
    The layers call this when they are built. A backend that cannot be imported is skipped here:
    using it reports why.
    """
    name = backend or os.environ.get(_ENV) or None
    if name is not None:
        if name not in NAMES:  # refused when a layer is built, not at its first forward
            src = f"backend={name!r}" if backend else f"{_ENV}={name!r}"
            raise ValueError(f"{src}: unknown backend; choose one of {', '.join(NAMES)} "
                             f"(or None to pick the fastest that can run)")
        unavailable_reason(name, "cpu")  # imports it; any reason is given again on use
        return
    if torch.cuda.is_available():
        resolve(None, torch.device("cuda"))  # the automatic choice imports what it tries


def _device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or a "
                         f"torch.device") from None


def unavailable_reason(name: str, device: Union[str, torch.device]) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, otherwise the reason in words."""
    if name not in NAMES:
        return f"unknown backend {name!r}; choose one of {', '.join(NAMES)}"
    dev = _device(device)
    try:
        mod = _module(name)
    except ImportError as exc:  # an optional dependency (e.g. triton) is missing
        return f"cannot import {_MODULES[name]}: {exc}"
    return mod.unavailable(dev)


def backends(device: Union[str, torch.device, None] = None) -> Dict[str, str]:
    """Every backend with ``"available"`` or the reason it is not, for ``device``.

    ``device`` defaults to ``"cuda"`` when a GPU is usable, else ``"cpu"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {n: (unavailable_reason(n, device) or "available") for n in NAMES}


def chosen(backend: Optional[str], device: torch.device) -> str:
    """The name of the backend that runs ops for tensors on ``device`` (``backend``, else
    $REGHARM_BACKEND, else the first available of the device's preference order)."""
    name = backend
    if name is None:
        name = os.environ.get(_ENV) or None
    if name is not None:
        reason = unavailable_reason(name, device)
        if reason is not None:
            src = f"backend={name!r}" if backend is not None else f"{_ENV}={name!r}"
            raise BackendUnavailable(f"{src} cannot run on {device.type}: {reason}")
        return name
    for cand in _PREFERENCE.get(device.type, ("torch",)):
        if unavailable_reason(cand, device) is None:
            return cand
    return "reference"


def resolve(backend: Optional[str], device: torch.device):
    """The module that runs an op for tensors on ``device``."""
    return _module(chosen(backend, device))


# Backends that import cheaply are imported up front (native's import never fails: a missing
# extension is reported by its unavailable()), so that torch.compile never has to trace importlib.
for _name in ("reference", "torch", "native"):
    _module(_name)
