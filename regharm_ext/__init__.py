"""regharm_ext: image harmonization by matching regional references (PTL and LTL layers).

``regharm_ext.ops`` holds the two ops of the SPEC (``patch_stats``, ``masked_attention``) and
PTL's masked instance norm (``masked_norm``), ``regharm_ext.backends()`` says which backends can
run them (the module :mod:`regharm_ext.backends`, callable), ``PTL`` and ``LTL`` are the layers.
"""
from .backends import BackendUnavailable
from . import backends  # the module itself (callable): backends() and backends.preload both work
from .layers import LTL, PTL, SelfAttention, masked_instance_norm, resize_mask
from . import ops

__version__ = "0.1.0"
__all__ = ["backends", "BackendUnavailable", "ops", "PTL", "LTL", "SelfAttention",
           "masked_instance_norm", "resize_mask", "__version__"]
