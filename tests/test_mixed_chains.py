"""Chains whose blocks differ from each other, as real models' do, against eager PyTorch.

The other kernel tests build chains of alike blocks. Here each block draws its own options:
bias or not, BatchNorm or not (affine or not, momentum 0.1 / 0.5 / None, running statistics
tracked or not), any fused activation or none, Dropout or not; odd widths, a head of width 1,
batches 7 to 70, training and eval, two steps (the running statistics of the first feed the
second). That is where one block's activation site meets the next block's BatchNorm in a
kernel: a deferred dW between a BatchNorm block and one without, a ReLU's rebuild feeding a
GELU block's statistics. Same rule as test_kernels.py (`compare`), seeded, so a case that
fails fails every time; 200 seeds passed when it was written.

Not 1 input feature, nor 2 rows: BatchNorm with batch statistics after a Linear of one input,
or over two rows, gives an output that does not depend on that Linear, whose gradients are
then pure rounding noise, which a rule relative to eager's error does not judge.
"""
import random

import pytest
import torch
from test_kernels import compare
from torch import nn

from dwfast import Block

ACTIVATIONS = [None, nn.ReLU, lambda: nn.LeakyReLU(0.1), nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU,
               nn.Tanh]


def random_chain(rng: random.Random):
    """(in_features, blocks): 2 to 4 blocks, each with its own options (module docstring)."""
    in_features = prev = rng.choice([5, 16, 33])
    blocks = []
    depth = rng.randint(2, 4)
    for i in range(depth):
        width = rng.choice([3, 8, 17, 40, 64] + ([1] if i == depth - 1 else []))
        norm = None
        if rng.random() < 0.6:
            norm = nn.BatchNorm1d(width, momentum=rng.choice([0.1, 0.5, None]), affine=rng.random() < 0.8,
                                  track_running_stats=rng.random() < 0.85)
            if norm.weight is not None:
                nn.init.uniform_(norm.weight, 0.5, 1.5)
                nn.init.normal_(norm.bias)
            if norm.running_mean is not None:
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
        act = rng.choice(ACTIVATIONS)
        drop = nn.Dropout(rng.choice([0.2, 0.5])) if rng.random() < 0.25 else None
        blocks.append(Block(nn.Linear(prev, width, bias=rng.random() < 0.8), norm, act() if act else None, drop))
        prev = width
    return in_features, blocks


@pytest.mark.parametrize("seed", range(16))
def test_mixed_chain(kernel_device, seed):
    rng = random.Random(seed)
    in_features, blocks = random_chain(rng)
    x = torch.randn(rng.choice([7, 33, 70]), in_features)
    compare(blocks, x, torch.float32, kernel_device, training=rng.random() < 0.75, steps=2)
