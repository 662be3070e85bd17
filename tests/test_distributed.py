"""Synchronised BatchNorm across 2 CPU processes (gloo) against one process on the
concatenated batch: statistics merge, the pure-PyTorch SyncBatchNorm, and fused chains."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dwfast import distributed as D

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        fn(rank, *args)
    except BaseException as e:  # report to the parent with the traceback's text
        import traceback
        errors.put(f"rank {rank}: {e!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, *args):
    """Run fn(rank, *args) on WORLD gloo ranks; fail with the first rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, port, fn, args, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    if not errors.empty():
        pytest.fail(errors.get())
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _batch(rows=(13, 21)):
    """The full batch (rows of rank 0, then rank 1): the same on every rank, seeded."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(rows), 6, generator=g) * 3 + 100, rows


def _merge_worker(rank):
    x, rows = _batch()
    local = x[sum(rows[:rank]):sum(rows[:rank + 1])]
    count, mean, var = D.merge_stats(torch.tensor(float(local.shape[0])), local.mean(0), local.var(0, unbiased=False))
    assert count.item() == x.shape[0]
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=1e-5, atol=1e-5)


def _sync_bn_worker(rank):
    x, rows = _batch()
    sync, ref = nn.SyncBatchNorm(6, momentum=None), nn.BatchNorm1d(6, momentum=None)
    nn.init.uniform_(sync.weight, 0.5, 1.5)
    nn.init.normal_(sync.bias)
    ref.load_state_dict(sync.state_dict())
    torch.manual_seed(0)
    x_local = x[sum(rows[:rank]):sum(rows[:rank + 1])].clone().requires_grad_()
    x_full = x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    D.batch_norm(x_local, sync).backward(grad[sum(rows[:rank]):sum(rows[:rank + 1])])
    ref(x_full).backward(grad)
    torch.testing.assert_close(x_local.grad, x_full.grad[sum(rows[:rank]):sum(rows[:rank + 1])], rtol=1e-4, atol=1e-5)
    # parameter grads are per-rank shares of the full batch's; DDP sums them: do it here
    for p_sync, p_ref in ((sync.weight, ref.weight), (sync.bias, ref.bias)):
        dist.all_reduce(p_sync.grad)
        torch.testing.assert_close(p_sync.grad, p_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sync.running_mean, ref.running_mean)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert sync.num_batches_tracked.item() == 1


def test_merge_stats():
    spawn(_merge_worker)


def test_sync_batch_norm_reference():
    spawn(_sync_bn_worker)


def _model(sync_module: bool):
    """The same initial model every call: SyncBatchNorm or BatchNorm1d, with momentum=None too."""
    norm = nn.SyncBatchNorm if sync_module else nn.BatchNorm1d
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), norm(16), nn.ReLU(), nn.Linear(16, 12), norm(12, momentum=None),
                         nn.GELU(), nn.Linear(12, 3))


def _ddp_worker(rank, backend, how):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import dwfast
    dwfast.set_backend(backend)
    x, rows = _batch(rows=(16, 16))  # equal shares: DDP's mean of gradients = the full batch's
    x = (x - 100) / 3
    target = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(4))
    mine = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
    ref = _model(sync_module=False)
    if how == "ddp":  # DDP refuses SyncBatchNorm in CPU modules: ask dwfast to synchronise
        fused = dwfast.sync_batchnorm(dwfast.fuse(_model(sync_module=False)))
        run = DistributedDataParallel(fused)
    else:  # nn.SyncBatchNorm children; average the gradients as DDP would
        fused = run = dwfast.fuse(_model(sync_module=True))
    opt, opt_ref = torch.optim.SGD(fused.parameters(), lr=0.05), torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(2):
        for model, o, xs, ts in ((run, opt, x[mine], target[mine]), (ref, opt_ref, x, target)):
            o.zero_grad()
            F.mse_loss(model(xs), ts).backward()
            if model is fused and how != "ddp":
                for p in fused.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            o.step()
    for (name, got), want in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x[mine]), ref(x[mine]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["ddp", "SyncBatchNorm"])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_synchronised_training_matches_single_process(backend, how):
    """A fused model with synchronised BatchNorms (dwfast.sync_batchnorm under DDP, or
    nn.SyncBatchNorm children), trained on 2 ranks, equals one process training the
    BatchNorm1d model on the concatenated batch."""
    spawn(_ddp_worker, backend, how)


def _double_backward_worker(rank):
    import dwfast
    dwfast.set_backend("interpret")
    fused = dwfast.fuse(_model(sync_module=True))
    x, rows = _batch(rows=(16, 16))
    x = ((x - 100) / 3)[sum(rows[:rank]):sum(rows[:rank + 1])].requires_grad_()
    with pytest.raises(NotImplementedError, match="synchronised BatchNorm"):
        torch.autograd.grad(fused(x).sum(), x, create_graph=True)


def test_no_double_backward_through_synchronised_batchnorm():
    """create_graph=True through synchronised statistics raises, as eager SyncBatchNorm's
    backward (no derivative of its own) fails, rather than differentiate local statistics."""
    spawn(_double_backward_worker)


def _uneven_worker(rank, backend, rows, compiled=False):
    import dwfast
    dwfast.set_backend(backend)
    x, _ = _batch(rows=rows)
    x = (x - 100) / 3
    mine = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
    fused, ref = dwfast.fuse(_model(sync_module=True)), _model(sync_module=False)
    run = torch.compile(fused, backend="aot_eager") if compiled else fused
    out, want = run(x[mine]), ref(x)
    torch.testing.assert_close(out, want[mine], rtol=1e-4, atol=1e-5)
    for (name, got), want_state in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want_state, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if not compiled:  # the ranks' gradients sum to the whole batch's
        out.square().sum().backward()
        want.square().sum().backward()
        for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend, rows", [("torch", (1, 3)), ("interpret", (1, 3)), ("torch", (0, 4)),
                                           ("interpret", (0, 4))])
def test_synchronised_uneven_batches(backend, rows):
    """A rank with one row, or none, in a synchronised training step: the group's batch has
    more than one row, so it normalises with the group's statistics as eager SyncBatchNorm does
    (one row raises only where the group has a single rank), and the ranks' gradients sum to
    the whole batch's. A rank without rows makes the collectives the fused ranks make."""
    spawn(_uneven_worker, backend, rows)


def test_synchronised_compiled_first_call():
    """torch.compile of a fused model with SyncBatchNorm over the default group: its first call,
    with no eager call before, synchronises as eager does (the traced op names the group by an
    id that needs no registration at trace time)."""
    spawn(_uneven_worker, "interpret", (4, 4), True)
