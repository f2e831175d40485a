"""Eager calls of the compiled ops that record a backward, without register_autograd's per-call
cost: its wrapper walks the op schema on every call (``fill_defaults``, ~23 µs for patch_stats's
ten arguments on a 2-core CPU), and PTL's fwd+bwd is host-bound on a GPU. The autograd.Function
built here runs the op (inside ``Function.forward`` grad mode is off, so the op takes its
registered no-grad path) with the very ``setup_context`` and ``backward`` registered for it."""
from __future__ import annotations

import torch


def eager_grad(*tensors) -> bool:
    """True for an eager call that records a backward. Compiled code calls the ops themselves:
    dynamo traces their registered autograd, and refuses a Function given one tensor twice (as
    LTL's self-attention passes it)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in tensors))


def register_autograd(qualname: str, backward, setup_context):
    """``torch.library.register_autograd(qualname, backward, setup_context=setup_context)``, and
    the autograd.Function for eager calls that runs the op with the very same setup and backward
    (named after the op: ``regharm::patch_stats`` gives ``_PatchStats``)."""
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name)

    def forward(ctx, *inputs):
        # outputs without a gradient (lse, mass, the compaction) reach backward as None rather
        # than as zero tensors autograd would fill: one kernel each, every backward
        ctx.set_materialize_grads(False)
        out = op(*inputs)
        setup_context(ctx, inputs, out)
        return out

    return type("_" + name.title().replace("_", ""), (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
