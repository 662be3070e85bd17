"""CUDA graphs: a whole fused training step (forward, backward, optimizer step) is captured
with `torch.cuda.graph` and replayed. Capture fails on any host synchronisation and replay
would reuse stale memory on any allocation the caching allocator can't replay, so matching
eager step for step checks both. GPU only."""
import copy

import pytest
import torch

import dwfast
from conftest import requires_cuda
from test_compile import small_model

pytestmark = requires_cuda


@pytest.fixture
def highest_precision():
    """fp32 GEMMs in IEEE fp32, in the kernels and in eager alike, so the two agree closely."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


def _step(model, opt, x, grad):
    opt.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(grad)
    opt.step()
    return out


@pytest.mark.parametrize("bn,momentum", [(True, 0.1), (True, None), (False, 0.1)],
                         ids=["bn", "bn_cumulative", "no_bn"])
def test_training_step_replays_like_eager(highest_precision, bn, momentum):
    eager = small_model(40, bn, momentum).cuda()  # without BatchNorm: the whole-net kernel
    fused = dwfast.fuse(copy.deepcopy(eager))
    # SGD, not Adam: Adam would blow the ~0 gradients of biases before BatchNorm up to full steps
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    batches = [(torch.randn(96, 6, device="cuda"), torch.randn(96, 3, device="cuda")) for _ in range(5)]
    static_x, static_grad = (t.clone() for t in batches[0])

    # Warm up on a side stream, as torch.cuda.graphs asks: compiles the kernels, makes SGD's momentum.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, grad in batches[:2]:
            static_x.copy_(x)
            static_grad.copy_(grad)
            _step(fused, opt_f, static_x, static_grad)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt_f.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = _step(fused, opt_f, static_x, static_grad)  # recorded, not run

    for i, (x, grad) in enumerate(batches):
        want = _step(eager, opt_e, x, grad)
        if i < 2:
            continue
        static_x.copy_(x)
        static_grad.copy_(grad)
        graph.replay()
        torch.testing.assert_close(static_out, want, atol=1e-4, rtol=1e-4)
    for (name, got), want in zip(fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _models(bn=True):
    eager = small_model(40, bn).cuda()
    return eager, dwfast.fuse(copy.deepcopy(eager))


def _compare_steps(run_fused, eager, fused, batches, skip=0):
    """Train eager and the fused model (stepped by run_fused(x, grad) -> out) on the same
    batches with SGD; outputs from step `skip` on and the final state agree."""
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    for i, (x, grad) in enumerate(batches):
        want = _step(eager, opt_e, x, grad)
        opt_f.zero_grad(set_to_none=True)
        got = run_fused(x, grad)
        opt_f.step()
        if i >= skip:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (name, got), want in zip(fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "no_bn"])
def test_compile_reduce_overhead(highest_precision, bn):
    """torch.compile(mode="reduce-overhead"): CUDA graphs through torch.compile (cudagraph
    trees) replay the fused ops, running statistics included."""
    torch._dynamo.reset()
    eager, fused = _models(bn)
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    batches = [(torch.randn(96, 6, device="cuda"), torch.randn(96, 3, device="cuda")) for _ in range(6)]

    def run(x, grad):
        out = compiled(x)
        out.backward(grad)
        return out.clone()  # cudagraph trees reuse an output's memory on the next replay

    _compare_steps(run, eager, fused, batches)


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "no_bn"])
def test_make_graphed_callables(highest_precision, bn):
    """torch.cuda.make_graphed_callables: the fused forward and backward captured as graphs."""
    eager, fused = _models(bn)
    sample = torch.randn(96, 6, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(fused, (sample,))
    batches = [(torch.randn(96, 6, device="cuda"), torch.randn(96, 3, device="cuda")) for _ in range(5)]
    # make_graphed_callables runs warm-up iterations (3 by default) that update BatchNorm's
    # running statistics: run the eager model as many times first.
    with torch.no_grad():
        for _ in range(3):
            eager(sample)

    def run(x, grad):
        out = graphed(x.requires_grad_())
        out.backward(grad)
        return out

    _compare_steps(run, eager, fused, batches)
