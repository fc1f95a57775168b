"""Autograd of the ops, registered once: one ``torch.autograd.Function`` per op, used
by the op's Autograd dispatch kernel (raw ``torch.ops.attention_ext`` calls) and called
directly by the public functions.

Like ``torch.library.register_autograd``, the kernel runs the op through the Function
when gradients are needed and redispatches past autograd otherwise. Unlike it:
- the Function has a ``setup_context``, so the public functions work under torch.func
  grad / vjp / jacrev / vmap (functorch hands the Function to its
  ``custom_function_call``, which must be reached from the public function: below
  functorch's layer, inside the op's kernel, it has no kernel, so a raw op call under
  those transforms raises a clear error, as do torch.func transforms inside torch.compile);
- its ``jvp`` refuses forward mode: torch's generated Function is skipped when no input
  requires grad, which made ``torch.func.jvp`` and ``torch.autograd.forward_ad`` return
  zero tangents without a word;
- an op that is itself a backward pass refuses to be differentiated (double backward)
  instead of returning zeros.
"""

import torch
from torch.autograd import forward_ad
from torch._C._functorch import TransformType

_lib = torch.library.Library("attention_ext", "IMPL")
# torch.func transforms that must see the autograd.Function rather than the op
_FUNCTION_TRANSFORMS = (TransformType.Grad, TransformType.Jvp, TransformType.Vmap)


def _fill_defaults(op, args):
    """The dispatcher drops trailing arguments equal to their defaults; put them back."""
    schema_args = op._schema.arguments
    return tuple(args) + tuple(a.default_value for a in schema_args[len(args):])


def _innermost_transform():
    interpreter = torch._C._functorch.peek_interpreter_stack()
    return None if interpreter is None else interpreter.key()


def _functorch_differentiating():
    """A torch.func grad/vjp/jacrev/jvp transform is innermost."""
    return _innermost_transform() in (TransformType.Grad, TransformType.Jvp)


def _needs_function(args):
    """Whether the call must go through the autograd.Function: a gradient is wanted, or
    forward-mode AD is on (the Function's jvp then refuses)."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return True
    return forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled()


def register_op_autograd(qualname, backward, setup_context, *, functions):
    """Registers the Autograd kernel of op ``qualname`` and returns how the public
    functions call the op: ``call(*op_args)`` (every argument positional, in schema
    order). Under a torch.func grad/jvp/vmap transform it goes through the op's
    autograd.Function (``call.function``), which functorch must meet at its own layer;
    everywhere else, torch.compile and torch.func.functionalize included, it calls the op,
    whose Autograd kernel uses the same Function when a gradient is wanted.
    ``backward=None``: the op is itself a backward pass, and differentiating it raises
    (double backward). ``functions`` names the public functions for the messages."""
    op = getattr(torch.ops.attention_ext, qualname.split("::")[1]).default

    if backward is None:
        def backward(ctx, *grads):
            raise RuntimeError(f"attention_ext: double backward (the gradient of a gradient, e.g. a gradient "
                               f"penalty or a Hessian-vector product) is not supported by {functions}")

        def setup_context(ctx, inputs, output):
            pass

    def jvp(ctx, *tangents):
        raise RuntimeError(f"attention_ext: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is "
                           f"not supported by {functions}; use reverse mode (backward, torch.func.grad, vjp or "
                           f"jacrev)")

    def forward(*args):
        # autograd.Function runs this with grad and forward grad off (and below the
        # transform's level under torch.func): the op's kernel redispatches past autograd
        return op(*args)

    name = f"AttentionExtAutograd_{op._schema.name.split('::')[1]}"
    fn = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
        # under torch.vmap the Function's passes run the ops, whose vmap rules fold the
        # vmapped dim into the batch (register_batch_vmap)
        "generate_vmap_rule": True})

    def autograd_kernel(keyset, *args):
        if _functorch_differentiating():
            if torch.compiler.is_compiling():
                raise RuntimeError(f"attention_ext: torch.func grad/vjp/jacrev/jvp inside torch.compile are not "
                                   f"supported by {functions}; use torch.autograd inside the compiled region, or "
                                   f"torch.func outside it")
            raise RuntimeError(f"attention_ext: torch.func grad/vjp/jacrev/jvp over the raw op {qualname} are not "
                               f"supported; call {functions} instead")
        if _needs_function(args):
            return fn.apply(*_fill_defaults(op, args))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _lib.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)

    def call(*args):
        if not torch.compiler.is_compiling() and _innermost_transform() in _FUNCTION_TRANSFORMS:
            return fn.apply(*args)
        return op(*args)

    call.function = fn
    return call


def register_batch_vmap(qualname, batch_leading, per_index_with=()):
    """torch.vmap rule of op ``qualname``: the vmapped dim of every argument named in
    ``batch_leading`` (tensors whose dim 0 is the batch) folds into that batch dim, so one
    op call serves the whole vmap (unbatched ones are expanded). A vmapped argument of
    another kind (a block layout), or any argument named in ``per_index_with`` that is not
    None, runs the op once per vmap index."""
    op = getattr(torch.ops.attention_ext, qualname.split("::")[1]).default
    names = [a.name for a in op._schema.arguments]

    def rule(info, in_dims, *args):
        V = info.batch_size
        if V == 0:
            raise ValueError(f"attention_ext: torch.vmap over a dimension of size 0 is not supported ({qualname})")
        if any(d is not None and n not in batch_leading for n, d in zip(names, in_dims)) or any(
                a is not None and n in per_index_with for n, a in zip(names, args)):
            outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))) for i in range(V)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        folded = []
        for n, a, d in zip(names, args, in_dims):
            if n in batch_leading and isinstance(a, torch.Tensor):
                a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(V, *a.shape)
                a = a.reshape(V * a.shape[1], *a.shape[2:])
            folded.append(a)
        outs = op(*folded)
        return tuple(o.reshape(V, o.shape[0] // V, *o.shape[1:]) for o in outs), (0,) * len(outs)

    torch.library.register_vmap(qualname, rule)
