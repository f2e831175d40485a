"""regharm_ext: image harmonization by matching regional references (PTL and LTL layers).

``regharm_ext.ops`` holds the two ops of the SPEC (``patch_stats``, ``masked_attention``) and
PTL's masked instance norm (``masked_norm``), ``regharm_ext.backends()`` says which backends can
run them, ``PTL`` and ``LTL`` are the layers. (``regharm_ext.backends`` is that function: import
the module's other names with ``from regharm_ext.backends import preload``.)
"""
from .backends import BackendUnavailable, backends
from .layers import LTL, PTL, SelfAttention, masked_instance_norm, resize_mask
from . import ops

__version__ = "0.1.0"
__all__ = ["backends", "BackendUnavailable", "ops", "PTL", "LTL", "SelfAttention",
           "masked_instance_norm", "resize_mask", "__version__"]
