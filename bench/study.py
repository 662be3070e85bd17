"""``python -m bench study``: does depth buy accuracy at a fixed parameter count, and at what speed?

Trains ``dwfast.mlp_by_budget`` models of several depths, all with the same parameter budget,
on two tasks: (a) scikit-learn's bundled 8x8 ``digits`` (no download; skipped with a message if
scikit-learn is missing: ``pip install dwfast[bench]``) and (b) ``teacher``, a synthetic task whose
labels are quantile buckets of a random deep ReLU teacher network's output (seeded, generated on
the fly, classes balanced). Adam, a fixed number of epochs, several seeds; reports test accuracy
(mean and std over seeds) next to training throughput (samples/s over the whole training loop).

Two side claims are checked on the way:
- Linear collapse: a stack of Linear layers with no activation is one linear map. The trained
  deep linear net's product matrix reproduces its outputs, and it is no more accurate than a
  single trained Linear layer.
- Dead ReLUs: per hidden layer, the share of units that output zero on every test sample.
"""
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import dwfast

from . import device as dev
from . import records
from .sweep import CPU_NOTE, si

Data = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


@dataclass
class StudyConfig:
    """What the study trains. ``linear_depth`` is the depth of the deep linear net."""
    tasks: List[str] = field(default_factory=lambda: ["digits", "teacher"])
    depths: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    budget: float = 2e4
    epochs: int = 20
    batch: int = 64
    lr: float = 1e-3
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    teacher_samples: int = 5000
    linear_depth: int = 8


def digits(device: torch.device) -> Data:
    """sklearn's digits (1797 8x8 images, 10 classes), standardised, a fixed 80/20 split."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = torch.tensor(x[perm], dtype=torch.float32), torch.tensor(y[perm])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.8 * len(y))
    return x[:n].to(device), y[:n].to(device), x[n:].to(device), y[n:].to(device), 10


def teacher(device: torch.device, n: int, features: int = 32, classes: int = 4, depth: int = 6,
            width: int = 64, seed: int = 1234) -> Data:
    """``n`` Gaussian inputs labelled by a random ``depth``-layer ReLU net's scalar output,
    cut at its quantiles into ``classes`` balanced classes; 80/20 split."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    h = x
    for k in range(depth):
        w = torch.randn(h.shape[1], width, generator=gen) * (2.0 / h.shape[1]) ** 0.5
        h = torch.relu(h @ w) if k < depth - 1 else h @ w
    score = h @ torch.randn(width, generator=gen)
    y = torch.bucketize(score, torch.quantile(score, torch.linspace(0, 1, classes + 1)[1:-1]))
    m = int(0.8 * n)
    return x[:m].to(device), y[:m].to(device), x[m:].to(device), y[m:].to(device), classes


def train(model: nn.Module, data: Data, cfg: StudyConfig, seed: int) -> Tuple[float, float]:
    """Train ``model`` with Adam for ``cfg.epochs``; returns (test accuracy, train samples/s)."""
    xtr, ytr, xte, yte, _ = data
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    n = (len(ytr) // cfg.batch) * cfg.batch  # full batches only: BatchNorm needs > 1 row
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(ytr), generator=gen)[:n].to(ytr.device)
        for idx in perm.view(-1, cfg.batch):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if xtr.is_cuda:
        torch.cuda.synchronize()
    rate = cfg.epochs * n / (time.perf_counter() - start)
    return accuracy(model, xte, yte), rate


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def dead_relu_shares(model: nn.Module, x: torch.Tensor) -> List[float]:
    """Per ReLU layer, the share of units that are zero for every row of ``x`` (eval mode).

    Runs an unfused copy child by child: the fused forward never materialises activations.
    """
    plain = dwfast.unfuse(copy.deepcopy(model)).eval()
    shares = []
    with torch.no_grad():
        for layer in plain:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                shares.append(1.0 - (x > 0).any(0).float().mean().item())
    return shares


def linear_collapse(data: Data, cfg: StudyConfig, width: int, seed: int) -> dict:
    """Train a ``cfg.linear_depth``-layer linear net (no activation) and one Linear layer.

    Returns both accuracies and the largest output difference between the deep net and the
    single affine map ``W = W_L ... W_1``, ``b`` it collapses to.
    """
    xtr, _, xte, yte, classes = data
    sizes = [xtr.shape[1]] + [width] * (cfg.linear_depth - 1) + [classes]
    torch.manual_seed(seed)
    deep = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]).to(xtr.device)
    shallow = nn.Linear(sizes[0], classes).to(xtr.device)
    deep_acc, _ = train(deep, data, cfg, seed)
    shallow_acc, _ = train(shallow, data, cfg, seed)
    with torch.no_grad():
        w = torch.eye(sizes[0], device=xtr.device, dtype=torch.float64)
        b = torch.zeros(sizes[0], device=xtr.device, dtype=torch.float64)
        for lin in deep:
            w, b = lin.weight.double() @ w, lin.weight.double() @ b + lin.bias.double()
        err = (deep(xte).double() - (xte.double() @ w.T + b)).abs().max().item()
    return {"depth": cfg.linear_depth, "width": width, "deep_acc": deep_acc, "shallow_acc": shallow_acc,
            "collapse_err": err}


def run(cfg: StudyConfig, device: torch.device, console: Console = None) -> dict:
    """Run the study; returns the JSON-ready document (not yet saved)."""
    console = console or Console()
    tasks = {}
    for name in cfg.tasks:
        if name == "digits":
            try:
                tasks[name] = digits(device)
            except ImportError:
                console.print("[yellow]scikit-learn is not installed: skipping digits "
                              "(pip install scikit-learn)[/]")
        elif name == "teacher":
            tasks[name] = teacher(device, cfg.teacher_samples)
        else:
            raise ValueError(f"unknown study task {name!r}; choose digits or teacher")
    rows, collapse = [], []
    with Progress(console=console) as progress:
        bar = progress.add_task("study", total=len(tasks) * (len(cfg.depths) * len(cfg.seeds) + 1))
        for name, data in tasks.items():
            features, classes = data[0].shape[1], data[4]
            for depth in cfg.depths:
                accs, rates = [], []
                for seed in cfg.seeds:
                    progress.update(bar, description=f"{name} depth {depth} seed {seed}")
                    torch.manual_seed(seed)
                    model = dwfast.mlp_by_budget(features, int(cfg.budget), depth, classes, device=device)
                    acc, rate = train(model, data, cfg, seed)
                    accs.append(acc)
                    rates.append(rate)
                    progress.advance(bar)
                rows.append({"task": name, "depth": depth, "width": model[0].out_features,
                             "n_params": dwfast.count_params(model), "accs": accs,
                             "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                             "samples_per_s": float(np.median(rates)),
                             "dead_relu": dead_relu_shares(model, data[2])})
            width = next(r["width"] for r in rows if r["task"] == name and r["depth"] == max(cfg.depths))
            progress.update(bar, description=f"{name} linear collapse")
            collapse.append(dict(task=name, **linear_collapse(data, cfg, width, cfg.seeds[0])))
            progress.advance(bar)
    notes = [CPU_NOTE] if device.type != "cuda" else []
    return {"schema": records.SCHEMA_VERSION, "kind": "study", "env": dev.environment(device),
            "config": dict(asdict(cfg), notes=notes), "rows": rows, "linear_collapse": collapse}


def print_table(doc: dict, console: Console = None) -> None:
    """Accuracy and throughput per task and depth, then the linear-collapse check. Fits 80
    columns: dead ReLUs as the mean and largest share over layers (per layer in the record)."""
    console = console or Console()
    console.print(f"study: {si(doc['config']['budget'])} parameters on {doc['env']['device']}",
                  highlight=False, markup=False)
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    for name in ["task", "depth", "width", "params", "test acc", "train samples/s", "dead ReLU mean/max"]:
        table.add_column(name, justify="left" if name == "task" else "right", no_wrap=True)
    for r in doc["rows"]:
        dead = r["dead_relu"]
        table.add_row(r["task"], str(r["depth"]), str(r["width"]), str(r["n_params"]),
                      f"{r['acc_mean']:.3f}±{r['acc_std']:.3f}", si(r["samples_per_s"]),
                      f"{np.mean(dead):.0%}/{max(dead):.0%}" if dead else "n/a")
    console.print(table)
    for c in doc["linear_collapse"]:
        console.print(f"{c['task']}: {c['depth']}-layer linear net acc {c['deep_acc']:.3f}, one Linear "
                      f"{c['shallow_acc']:.3f}, collapse error {c['collapse_err']:.1e}", highlight=False)
    for note in doc["config"]["notes"]:
        console.print(f"[bold yellow]{note}[/]")


if __name__ == "__main__":  # `python -m bench.study`: the same as `python -m bench study`
    import sys

    from .__main__ import main
    sys.exit(main(["study", *sys.argv[1:]]))
