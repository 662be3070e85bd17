"""``python -m bench.sanitize_chain``: a small fused chain, forward and backward, for
``compute-sanitizer`` (memcheck, racecheck, synccheck) to watch; the GPU kit runs it.

Odd sizes, so every kernel runs partial tiles at its edges: a per-layer chain with BatchNorm,
ReLU and Dropout in training (forward, backward, running statistics) and in eval; and a
narrow BatchNorm-free chain, which takes the whole-net kernel forward and backward. Each
result is checked against the unfused model, so a kernel that reads or writes out of bounds
and gets away with it still fails here. Exit status 0 when everything matches.
"""
import argparse
import copy

import torch

import dwfast

BATCH, FEATURES, OUTPUTS = 67, 45, 3


TOL = 1e-2


def _check(name: str, pairs) -> None:
    """Exit with a message unless every ``(what, fused, eager)`` pair agrees within ``TOL``."""
    errs = {what: (got.double() - want.double()).abs().max().item() for what, got, want in pairs}
    bad = {what: err for what, err in errs.items() if not err <= TOL}
    if bad:
        raise SystemExit(f"{name}: fused and eager differ (tolerance {TOL:g}): {bad}")
    print(f"{name}: {len(errs)} tensors match, max difference {max(errs.values()):.2e}")


def chain(device: torch.device, hidden, batchnorm: bool, dropout: float, train: bool) -> None:
    """One step of a fused ``dwfast.MLP`` against its unfused copy; checks the output and,
    when training, the input's and every parameter's gradient."""
    torch.manual_seed(0)
    fused = dwfast.MLP(FEATURES, hidden, OUTPUTS, batchnorm=batchnorm, dropout=dropout, device=device)
    eager = dwfast.unfuse(copy.deepcopy(fused))
    fused.train(train)
    eager.train(train)
    x = torch.randn(BATCH, FEATURES, device=device, requires_grad=train)
    name = f"hidden {hidden}, {'BN' if batchnorm else 'no BN'}, dropout {dropout}, {'train' if train else 'eval'}"
    if dropout and train:  # masks differ from eager's by design: check that it runs, and its shape
        out = fused(x)
        out.sum().backward()
        assert out.shape == (BATCH, OUTPUTS) and torch.isfinite(x.grad).all()
        print(f"{name}: ran, finite gradients")
        return
    x_eager = x.detach().requires_grad_(train)
    with torch.set_grad_enabled(train):
        got, want = fused(x), eager(x_eager)
    pairs = [("output", got, want)]
    if train:
        got.sum().backward()
        want.sum().backward()
        pairs += [("grad input", x.grad, x_eager.grad)]
        pairs += [(f"grad {n}", p.grad, q.grad) for (n, p), q in zip(fused.named_parameters(), eager.parameters())]
        pairs += [(n, a, b) for (n, a), b in zip(fused.named_buffers(), eager.buffers())]
    _check(name, pairs)


def main(argv=None) -> None:
    """Run every chain on ``--device`` (default cuda); raises SystemExit on a mismatch."""
    p = argparse.ArgumentParser(prog="python -m bench.sanitize_chain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    device = torch.device(p.parse_args(argv).device)
    # fp32 products in IEEE fp32 on both sides, so the tolerance only covers summation order
    torch.set_float32_matmul_precision("highest")
    chain(device, [97, 40], batchnorm=True, dropout=0.0, train=True)
    chain(device, [97, 40], batchnorm=True, dropout=0.0, train=False)
    chain(device, [97, 40], batchnorm=True, dropout=0.2, train=True)
    chain(device, [48, 40, 33], batchnorm=False, dropout=0.0, train=True)  # the whole-net kernel
    print("sanitize_chain: all chains ran")


if __name__ == "__main__":
    main()
