"""dwfast benchmarks: the depth-vs-width sweep, its report, the training study and profiling.

Entry points: ``python -m bench`` (sweep), ``python -m bench report``, ``python -m bench study``,
``python -m bench gpu`` (``bench/gpu.sh``, the GPU kit), ``python -m bench.profile``,
``python -m bench.roofline``, ``bench/ncu.sh`` and ``pytest bench --benchmark-only``. See
``bench/README.md``.
"""
