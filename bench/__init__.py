"""dwfast benchmarks: the depth-vs-width sweep, its report, the training study and profiling.

Entry points: ``python -m bench`` (sweep), ``python -m bench report``, ``python -m bench study``,
``python -m bench gpu`` (``bench/gpu.sh``, the GPU kit), ``python -m bench.profile``,
``python -m bench.roofline``, ``bench/ncu.sh`` and ``pytest bench --benchmark-only``. See
``bench/README.md``.
"""
import argparse


def comma_list(kind=str, choices=None, minimum=None):
    """An argparse type: a comma-separated list of `kind` values, each one of `choices` if given,
    and at least `minimum` if given."""
    def parse(text):
        values = [kind(v) for v in text.split(",")]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(map(str, choices))}")
        small = [v for v in values if minimum is not None and v < minimum]
        if small:
            raise argparse.ArgumentTypeError(f"{small}: each must be at least {minimum}")
        return values
    return parse


def at_least(minimum, kind=int):
    """An argparse type: one `kind` value of at least `minimum`."""
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value
    return parse
