"""dwfast's custom ops, registered through torch.library at a fraction of custom_op's host time.

`torch.library.custom_op` wraps every call in Python: it flattens every argument with pytree,
fills in defaults, bumps version counters in its own ADInplaceOrView kernel and guards the
kernel against dynamo. On this project's slow CPU that cost 126 us per call of a
differentiable op taking a tensor, a list of 8 and 40 ints, and more with a chain's lists, where
a training step makes three such calls. The same op defined with its schema on a
`torch.library.Library`, with a CompositeExplicitAutograd kernel, a fake and an Autograd kernel
that is one torch.autograd.Function over the flattened tensors, cost 31 us; it is an ordinary
op to the dispatcher, torch.compile and opcheck.

    @custom_op("chain_forward")                       # schema from the annotations
    def chain_forward(x: Tensor, ws: List[Tensor], ...) -> List[Tensor]: ...
    register_fake(chain_forward, fake)
    register_autograd(chain_forward, backward, setup_context=setup_context)

as torch.library's. One difference: `ctx.needs_input_grad` is per tensor of the flattened
inputs (a list argument's tensors in order), so index 0 is the first argument when that is a
tensor.
"""
import functools
from typing import Callable, Sequence

import torch

LIB = torch.library.Library("dwfast", "FRAGMENT")
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def direct(tensors) -> bool:
    """Whether an eager call may go around its custom op to the same code (dwfast.ops._Chain,
    dwfast.whole_net._WholeNet), skipping the dispatcher's per-tensor costs: not while
    torch.compile or export traces, under a dispatch or function mode (FakeTensorMode,
    FlopCounterMode, ...) or the profiler (whose traces name the ops), and for plain tensors
    only (a subclass dispatches through the op)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled()):
        return False
    return _PLAIN.issuperset(map(type, tensors))


def direct_apply(function):
    """`function.apply` (a torch.autograd.Function subclass) without its Python wrapper, for the
    direct calls: the wrapper binds defaults and walks every argument for functorch's dead
    wrappers (about 10 us for a chain's 70 inputs), and direct calls run outside functorch
    transforms (functional._fusable sends those eagerly) on module parameters; the caller
    unwraps its input (`unwrap_if_dead`), the one tensor that may come out of a finished one."""
    return super(torch.autograd.Function, function).apply


unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _on_device(fn: Callable) -> Callable:
    """`fn` run with its first argument's GPU as the current device: Triton launches on the
    current device, which is GPU 0 unless the user set another, also when a model and its
    inputs live on cuda:1 (a DDP rank that moved its model without torch.cuda.set_device)."""
    @functools.wraps(fn)
    def kernel(*args):
        first = args[0]
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return fn(*args)
        return fn(*args)
    return kernel


def custom_op(name: str, mutates_args: Sequence[str] = ()):
    """Define `dwfast::name` from the decorated function's annotations (torch.library's
    infer_schema), with that function as its kernel for every device, run on the device of its
    first argument (a tensor); the tensors it mutates get their version counters bumped after
    it, as in-place ops bump them. (In the kernel itself rather than in an ADInplaceOrView
    kernel: a Python kernel there would convert every argument between Python and the
    dispatcher twice more, and inference mode, which skips that key, bumps a normal tensor's
    version as eager's in-place ops do.) Returns the op (an OpOverload: call it like the
    function)."""
    def define(fn: Callable):
        LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        op = getattr(torch.ops.dwfast, name).default
        mutated = [i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        kernel = fn
        if mutated:
            @functools.wraps(fn)
            def kernel(*args):
                out = fn(*args)
                for i in mutated:
                    torch.autograd.graph.increment_version(args[i])
                return out
        LIB.impl(name, _on_device(kernel), "CompositeExplicitAutograd")
        return op
    return define


def register_fake(op, fn: Callable) -> None:
    """`fn` computes `op`'s outputs' shapes and dtypes (for torch.compile and opcheck)."""
    torch.library.register_fake(op, fn, lib=LIB)


def _flatten(args):
    """(`args` with their lists of tensors expanded, and how to rebuild `args` from that)."""
    flat, layout = [], []
    for a in args:
        if isinstance(a, list) and (not a or isinstance(a[0], torch.Tensor)):
            flat.extend(a)
            layout.append(len(a))
        else:
            flat.append(a)
            layout.append(-1)
    return flat, layout


def _unflatten(flat, layout):
    args, i = [], 0
    for n in layout:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


def register_autograd(op, backward: Callable, *, setup_context: Callable) -> None:
    """Make `op` differentiable: `setup_context(ctx, inputs, output)` and `backward(ctx,
    grads)` as torch.library.register_autograd takes them (grads: one per output, a list for a
    list output; backward returns one per input, a list for a list input)."""

    returns = op._schema.returns
    list_output = len(returns) == 1 and isinstance(returns[0].type, torch.ListType)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *flat_and_layout):  # (the layout last: needs_input_grad[0] is the first input's)
            layout = flat_and_layout[-1]
            args = _unflatten(flat_and_layout[:-1], layout)
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            setup_context(ctx, args, output)
            ctx.layout = layout
            return tuple(output) if list_output else output

        @staticmethod
        def backward(ctx, *grads):
            flat = []
            for g, n in zip(backward(ctx, list(grads)) if list_output else backward(ctx, *grads), ctx.layout):
                if n < 0:
                    flat.append(g)
                else:
                    flat.extend(g if g is not None else [None] * n)
            return (*flat, None)  # (None: the layout's)

    def kernel(*args):
        flat, layout = _flatten(args)
        output = Function.apply(*flat, layout)
        return list(output) if list_output else output

    LIB.impl(op._schema.name.split("::")[1], kernel, "Autograd")
