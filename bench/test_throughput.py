"""pytest-benchmark cases: one training or inference step per implementation and shape.

    pytest bench --benchmark-only --benchmark-group-by=param:shape
    pytest bench --benchmark-only --benchmark-json=bench-$(git rev-parse --short HEAD).json
    pytest-benchmark compare bench-*.json          # across commits

``shape`` names the mode and the model (``train-deep-d64``), so grouping by it puts the
implementations side by side. Full size on CUDA (bf16, with both CUDA-graph implementations);
small on the CPU (fp32); ``DWFAST_BENCH_SIZE=tiny`` shrinks either to seconds (CI). torch.compile
is in everywhere (its compile time stays out of the measurement); ``compile-max-autotune`` is
left to the sweep, whose compiles it would multiply. Every timed call ends with a CUDA
synchronisation, so GPU work is inside the measurement. Not collected by the default
``pytest`` run (see ``bench/conftest.py``).
"""
import os

import pytest
import torch

from bench import models

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = "bf16" if CUDA else "fp32"
FEATURES = 128
IMPLS = [i for i in models.IMPLS if i != "compile-max-autotune" and not models.not_applicable(i, DEVICE)]
# name: (parameter budget, hidden layers, batch)
SIZES = {"full": {"wide-d1": (5e7, 1, 8192), "mid-d8": (5e7, 8, 8192), "deep-d64": (1e6, 64, 8192)},
         "small": {"wide-d1": (1e5, 1, 256), "mid-d4": (1e5, 4, 256), "deep-d16": (2e4, 16, 256)},
         "tiny": {"wide-d1": (2e4, 1, 32), "deep-d2": (2e4, 2, 32)}}
MODELS = SIZES[os.environ.get("DWFAST_BENCH_SIZE", "full" if CUDA else "small")]
SHAPES = [f"{mode}-{name}" for mode in models.MODES for name in MODELS]
if not CUDA:
    torch.set_num_threads(1)  # as `python -m bench`: more threads on a busy machine swing 100x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_step(benchmark, impl, shape):
    mode, name = shape.split("-", 1)
    budget, depth, batch = MODELS[name]
    reference = models.reference_model(FEATURES, budget, depth, 1, 0, DEVICE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, FEATURES, generator=gen).to(DEVICE)
    target = torch.randn(batch, 1, generator=gen).to(DEVICE)
    models.forget_compiled()
    step, label = models.make_step(impl, reference, mode, models.DTYPES[DTYPE], x, target)
    for _ in range(models.WARMUP_STEPS):  # compilation and autotuning stay out of the measurement
        step()

    def timed():
        step()
        if CUDA:
            torch.cuda.synchronize()
    benchmark.extra_info.update(batch=batch, flops=models.step_flops(reference, batch, mode),
                                precision=label, width=reference[0].out_features, depth=depth,
                                device=torch.cuda.get_device_name() if CUDA else "cpu")
    benchmark(timed)
