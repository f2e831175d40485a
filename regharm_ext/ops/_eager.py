"""Eager calls of the compiled ops that record a backward, without register_autograd's per-call
cost: its wrapper walks the op schema on every call (``fill_defaults``, ~23 µs for patch_stats's
ten arguments on a 2-core CPU), and PTL's fwd+bwd is host-bound on a GPU. The autograd.Function
built here runs the op (inside ``Function.forward`` grad mode is off, so the op takes its
registered no-grad path) with the very ``setup_context`` and ``backward`` registered for it.

:class:`Direct` goes one step further where nothing can tell the difference: a call through
``torch.ops`` passes Python layers on its way to the kernels (the registered autograd kernel's
no-grad redispatch, and for a ``triton_op`` custom_op's wrapper and a dynamo guard: ~45 µs per
call on the 2-core CPU, six calls per PTL fwd+bwd), so plain tensors in plain eager mode go to
the kernels (native) or the op's Python body (Triton) directly."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

# nn.Parameter only turns __torch_function__ off; anything else may override dispatch
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_grad(*tensors) -> bool:
    """True for an eager call that records a backward. Compiled code calls the ops themselves:
    dynamo traces their registered autograd, and refuses a Function given one tensor twice (as
    LTL's self-attention passes it)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in tensors))


def direct_ok(args) -> bool:
    """True where skipping the dispatcher changes nothing: grad mode off (the registered
    backwards run without it, see :func:`register_autograd`), no compiler, no dispatch or
    function mode (fake tensors, memory trackers, ``torch.device`` contexts), no functorch
    transform, plain tensors."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


class Direct:
    """``op(*args)``, or where :func:`direct_ok` holds the same result without the Python layers
    of the dispatch: ``body(*args)`` for an op written in Python (``body`` launches its kernels
    itself), else the op's kernel below the autograd key. A profiler still sees the op's name."""

    def __init__(self, op, body: Optional[Callable] = None):
        self.op, self.body = op, body
        self.name = getattr(op, "_qualified_op_name", str(op))

    def _direct(self, args):
        if self.body is None:  # the dispatcher still records the op for a profiler
            with torch._C._AutoDispatchBelowAutograd():
                return self.op(*args)
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(self.name):
                return self.body(*args)
        return self.body(*args)

    def __call__(self, *args):
        return self._direct(args) if direct_ok(args) else self.op(*args)


def register_autograd(qualname: str, backward, setup_context, body: Optional[Callable] = None):
    """``torch.library.register_autograd(qualname, backward, setup_context=setup_context)``, and
    the autograd.Function for eager calls that runs the op (:class:`Direct`, ``body`` for an op
    written in Python) with the very same setup and backward (named after the op:
    ``regharm::patch_stats`` gives ``_PatchStats``). The backward ops have no derivative of their
    own: ``once_differentiable`` makes a second backward through them (``create_graph=True``)
    raise instead of returning zeros, which is what the dispatcher's fallback does (with a
    warning)."""
    backward = once_differentiable(backward)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    namespace, name = qualname.split("::")
    op = Direct(getattr(getattr(torch.ops, namespace), name), body)

    def forward(ctx, *inputs):
        # outputs without a gradient (lse, mass, the compaction) reach backward as None rather
        # than as zero tensors autograd would fill: one kernel each, every backward
        ctx.set_materialize_grads(False)
        out = op(*inputs)
        setup_context(ctx, inputs, out)
        return out

    return type("_" + name.title().replace("_", ""), (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


class Step:
    """One autograd.Function of ours run inside another Function's node (PTL's single node,
    :mod:`regharm_ext.ptl_node`): its own ``forward`` and ``backward`` on this stand-in ctx,
    which offers what they use (``save_for_backward``, ``saved_tensors``, ``needs_input_grad``,
    attributes). The owner saves :attr:`saved` with its own ``ctx.save_for_backward`` (version
    checks, saved-tensor hooks) and gives them back with :meth:`restore` before
    :meth:`backward`."""

    def __init__(self, fn, needs_input_grad=()):
        self.fn, self.needs_input_grad, self.saved = fn, tuple(needs_input_grad), ()

    def forward(self, *inputs):
        return self.fn.forward(self, *inputs)

    def backward(self, *grads):
        return self.fn.backward(self, *grads)

    def save_for_backward(self, *tensors):
        self.saved = tensors

    def set_materialize_grads(self, value: bool):  # the owner passes None for unused outputs
        pass

    @property
    def saved_tensors(self):
        return self.saved

    def restore(self, tensors):
        self.saved = tuple(tensors)

    def release(self):
        self.saved = ()
