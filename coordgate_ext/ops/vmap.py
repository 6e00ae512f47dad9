"""torch.func support of the custom operators, written once for both namespaces
(coordgate_ext, coordgate_ext_triton):

- a vmap rule for every op. When only the per-sample tensors (``input``, ``grad_out``,
  ``conv_out``) are batched and every output asked for is per sample, the vmap dimension is
  folded into N: one call on (B*N, C, H, W). Otherwise (weights, gate or encoder batched, or a
  backward op asked for weight gradients, which sum over N) the op runs once per slice and
  the slices are stacked: correct for any in_dims.
- an autograd kernel that torch.func.grad / vjp / jacrev can run. The autograd.Function that
  torch.library.register_autograd generates has no separate setup_context, which functorch
  requires (pytorch/pytorch#168393, #179652), and applying one from inside an op's autograd
  kernel cannot reach functorch's dispatch anyway. ``register_autograd`` takes the same
  (backward, setup_context) pair and records the node at the transform's own level, as a C++
  autograd kernel does. Forward-mode AD raises NotImplementedError saying so, where the
  generated kernel gave torch.func.jvp a zero tangent.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.autograd.forward_ad as forward_ad
from torch._functorch.utils import enable_single_level_autograd_function
from torch.utils import _pytree as pytree

from . import _library
from .gated_conv2d import output_memory_format

__all__ = ["PER_SAMPLE_ARGS", "vmap_rule", "register_autograd", "register"]

#: Arguments that hold one image per sample, N first: the vmap dimension may fold into N.
PER_SAMPLE_ARGS = ("input", "grad_out", "conv_out")
#: The libraries holding the autograd kernels registered here, by namespace.
_LIBRARIES: dict[str, torch.library.Library] = {}


def _lookup(qualname: str) -> torch._ops.OpOverload:
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _is_placeholder(shape) -> bool:
    """The (0,) tensor an op returns for an output it was not asked for (or takes for a
    convolution it must recompute): the same for every sample."""
    return len(shape) == 1 and shape[0] == 0


def _sample_shape(x: torch.Tensor, in_dim: int | None):
    return x.shape if in_dim is None else x.shape[:in_dim] + x.shape[in_dim + 1:]


def _any_batched(in_dim) -> bool:
    if isinstance(in_dim, int):
        return True
    return isinstance(in_dim, (list, tuple)) and any(_any_batched(d) for d in in_dim)


def _select(arg, in_dim, index: int | None):
    """Sample ``index`` of an argument batched along in_dim (tensors and tensor lists);
    index None: zeros of a sample's shape."""
    if isinstance(arg, torch.Tensor) and isinstance(in_dim, int):
        return arg.new_zeros(_sample_shape(arg, in_dim)) if index is None else arg.select(in_dim, index)
    if isinstance(arg, (list, tuple)) and isinstance(in_dim, (list, tuple)):
        return [_select(a, d, index) for a, d in zip(arg, in_dim)]
    return arg


def vmap_rule(op: torch._ops.OpOverload) -> Callable:
    """The vmap rule of ``op``: ``rule(info, in_dims, *args) -> (outputs, out_dims)``."""
    names = [a.name for a in op._schema.arguments]
    per_sample = [i for i, name in enumerate(names) if name in PER_SAMPLE_ARGS]
    # A backward op's outputs other than grad_input are sums over N.
    mask_index = names.index("output_mask") if "output_mask" in names else None

    def foldable(args, in_dims) -> bool:
        if not any(_any_batched(in_dims[i]) for i in per_sample):
            return False
        if any(_any_batched(d) for i, d in enumerate(in_dims) if i not in per_sample):
            return False
        return mask_index is None or not any(args[mask_index][1:])

    def folded(batch: int, args, in_dims):
        args = list(args)
        samples = None
        for i in per_sample:
            x, d = args[i], in_dims[i]
            if x is None:
                continue
            if _is_placeholder(_sample_shape(x, d)):
                args[i] = x.new_empty((0,))
                continue
            x = x.expand(batch, *x.shape) if d is None else x.movedim(d, 0)
            samples = x.shape[1]
            # Each sample's layout (channels_last in, channels_last out), where flattening
            # has to copy.
            layout = output_memory_format(x[0]) if batch else torch.contiguous_format
            args[i] = x.flatten(0, 1).contiguous(memory_format=layout)
        leaves, spec = pytree.tree_flatten(op(*args))
        outs, dims = [], []
        for leaf in leaves:
            if _is_placeholder(leaf.shape):
                outs.append(leaf)
                dims.append(None)
            else:
                outs.append(leaf.unflatten(0, (batch, samples)))
                dims.append(0)
        return outs, dims, spec

    def looped(batch: int, args, in_dims):
        slices = []
        for index in range(batch) if batch else (None,):
            leaves, spec = pytree.tree_flatten(op(*(_select(a, d, index) for a, d in zip(args, in_dims))))
            slices.append(leaves)
        outs, dims = [], []
        for column in zip(*slices):
            if all(_is_placeholder(t.shape) for t in column):
                outs.append(column[0])
                dims.append(None)
            else:
                # An empty batch ran once on zeros, for the outputs' shapes.
                outs.append(torch.stack(column) if batch else column[0].new_empty((0, *column[0].shape)))
                dims.append(0)
        return outs, dims, spec

    def rule(info, in_dims, *args):
        in_dims = list(in_dims)
        if foldable(args, in_dims):
            outs, dims, spec = folded(info.batch_size, args, in_dims)
        else:
            outs, dims, spec = looped(info.batch_size, args, in_dims)
        return pytree.tree_unflatten(outs, spec), pytree.tree_unflatten(dims, spec)

    return rule


def _not_list_of_tensor(tree) -> bool:
    """pytree leaf test: every argument is a leaf except the top tuple and tensor lists."""
    if isinstance(tree, tuple):
        return False
    if isinstance(tree, list):
        return any(not isinstance(t, torch.Tensor) for t in tree)
    return True


class _Spec:
    """How an op's arguments were flattened for autograd.Function.apply, its outputs, and
    the grad modes of the call."""

    def __init__(self, args: pytree.TreeSpec):
        self.args = args
        self.out: pytree.TreeSpec | None = None
        self.grad_enabled = torch.is_grad_enabled()
        self.fwd_grad_enabled = torch._C._is_fwd_grad_enabled()


def _forward_ad_active(args) -> bool:
    if forward_ad._current_level < 0:
        return False
    leaves = pytree.tree_leaves(args)
    return any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in leaves)


def register_autograd(qualname: str, backward: Callable, *, setup_context: Callable | None = None) -> None:
    """torch.library.register_autograd's contract (same ``backward`` and ``setup_context``),
    registered so that torch.func's grad transforms can run it: the autograd.Function has a
    separate setup_context, and its jvp raises."""
    op = _lookup(qualname)

    def forward(*operands):
        spec = operands[-1]
        args = pytree.tree_unflatten(list(operands[:-1]), spec.args)
        # apply() turned both grad modes off; a transform below this level must see the
        # caller's, as the op's own call would.
        with (torch.set_grad_enabled(spec.grad_enabled), forward_ad._set_fwd_grad_enabled(spec.fwd_grad_enabled),
              torch._C._AutoDispatchBelowAutograd()):
            leaves, spec.out = pytree.tree_flatten(op(*args))
        return tuple(leaves)

    def setup(ctx, inputs, output):
        spec = inputs[-1]
        ctx._coordgate_spec = spec
        if setup_context is not None:
            args = pytree.tree_unflatten(list(inputs[:-1]), spec.args)
            setup_context(ctx, args, pytree.tree_unflatten(list(output), spec.out))

    def backward_flat(ctx, *grads):
        spec = ctx._coordgate_spec
        flat_needs = ctx.needs_input_grad
        # What the registered backward expects: one entry per argument, a list of flags for
        # a tensor list.
        ctx.needs_input_grad = pytree.tree_unflatten(list(flat_needs[:-1]), spec.args)
        try:
            grads = pytree.tree_unflatten(list(grads), spec.out)
            result = backward(ctx, *(grads if isinstance(grads, tuple) else (grads,)))
        finally:
            ctx.needs_input_grad = flat_needs
        if not isinstance(result, tuple):
            result = (result,)
        flat = []
        for grad, arg_spec in zip(result, spec.args.children()):
            if grad is None:
                flat.extend([None] * arg_spec.num_leaves)
            elif isinstance(grad, (list, tuple)):
                flat.extend(grad)
            else:
                flat.append(grad)
        return (*flat, None)

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"{qualname}: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is not "
            "supported; use reverse mode (torch.func.grad, vjp, jacrev) or backend='reference'"
        )

    # A _SingleLevelFunction, as functorch's own per-level Functions: applied under
    # enable_single_level_autograd_function, it is not handed to custom_function_call.
    function = type(qualname.replace("::", "_"), (torch.autograd.function._SingleLevelFunction,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward_flat),
        "jvp": staticmethod(jvp),
    })

    def autograd_kernel(keyset, *args):
        differentiable = (
            (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
            or torch._C._are_functorch_transforms_active()
            or _forward_ad_active(args)
        )
        if not differentiable:
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        leaves, args_spec = pytree.tree_flatten(args, is_leaf=_not_list_of_tensor)
        spec = _Spec(args_spec)
        # Under a grad or jvp transform this kernel runs inside that transform's dispatch, on
        # its wrapped tensors: the Function records its node at that level, as a C++
        # autograd kernel does, and the op's call in forward goes down to the next transform
        # (a vmap below runs the op's vmap rule). Going through custom_function_call instead
        # would dispatch the transform again from inside its own dispatch.
        with enable_single_level_autograd_function():
            outputs = function.apply(*leaves, spec)
        return pytree.tree_unflatten(list(outputs), spec.out)

    namespace, opname = qualname.split("::")
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    # Replaces the kernel that torch.library.custom_op registered for the op (explicitly
    # allowed: torch 2.11 refuses an override by default, 2.13 and later allow it).
    _LIBRARIES[namespace].impl(opname, autograd_kernel, "Autograd", with_keyset=True,
                               allow_override=True)


def register(namespace: str, ops, autograd: Mapping[str, tuple[Callable, Callable]]) -> None:
    """The vmap rule of every op of ``ops``, and its torch.func-ready autograd: ``autograd``
    maps each forward op to its (backward, setup_context); a backward op (``*_backward``)
    refuses double backward."""
    for name in ops:
        qualname = f"{namespace}::{name}"
        torch.library.register_vmap(qualname, vmap_rule(_lookup(qualname)))
        if name.endswith("_backward"):
            register_autograd(qualname, _library._double_backward_unsupported())
        else:
            backward, setup_context = autograd[name]
            register_autograd(qualname, backward, setup_context=setup_context)


if _library.loaded():
    from . import gated_conv2d as _gated_conv2d
    from . import mlp_gate as _mlp_gate
    from . import mlp_gated_conv2d as _mlp_gated_conv2d

    register(_library.NAMESPACE, _library.OPS, {
        module.__name__.rsplit(".", 1)[-1]: (module._backward, module._setup_context)
        for module in (_gated_conv2d, _mlp_gate, _mlp_gated_conv2d)
    })
