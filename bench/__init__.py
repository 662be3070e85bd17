"""dwfast benchmarks: the depth-vs-width sweep, its report, the training study and profiling.

Entry points: ``python -m bench`` (sweep), ``python -m bench report``, ``python -m bench study``,
``python -m bench gpu`` (``bench/gpu.sh``, the GPU kit), ``python -m bench.profile``,
``python -m bench.roofline``, ``bench/ncu.sh`` and ``pytest bench --benchmark-only``. See
``bench/README.md``.
"""
import argparse
import math
from pathlib import Path

# Parameter budgets up to this (exclusive): 1e13 fp32 parameters are 40 TB, more than any device
# holds; far beyond, the widths no longer fit in a tensor's sizes.
BUDGET_BELOW = 1e13


def _out_of_range(value, minimum, below) -> bool:
    # (written so that NaN is out of every range, and infinity too)
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return minimum is not None and not value >= minimum or below is not None and not value < below


def _range_text(minimum, below) -> str:
    return " and ".join(([f"at least {minimum}"] if minimum is not None else [])
                        + ([f"less than {below}"] if below is not None else [])) or "finite"


def comma_list(kind=str, choices=None, minimum=None, below=None):
    """An argparse type: a comma-separated list of `kind` values, each one of `choices` if given,
    and (numbers) finite, at least `minimum` and less than `below` if given."""
    def parse(text):
        values = [kind(v) for v in text.split(",")]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(map(str, choices))}")
        small = [v for v in values if kind in (int, float) and _out_of_range(v, minimum, below)]
        if small:
            raise argparse.ArgumentTypeError(f"{small}: each must be {_range_text(minimum, below)}")
        return values
    return parse


def at_least(minimum, kind=int, below=None):
    """An argparse type: one finite `kind` value of at least `minimum` (and less than `below`)."""
    def parse(text):
        value = kind(text)
        if _out_of_range(value, minimum, below):
            raise argparse.ArgumentTypeError(f"{value}: must be {_range_text(minimum, below)}")
        return value
    return parse


def folder(text: str) -> Path:
    """An argparse type: a folder to write into (made when missing), not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a folder")
    return path


def new_file(text: str) -> Path:
    """An argparse type: a file to write, in a folder that exists ('-' passes as it is)."""
    path = Path(text)
    if text != "-" and (path.is_dir() or not path.parent.is_dir()):
        raise argparse.ArgumentTypeError(f"{text}: {'a folder' if path.is_dir() else 'no such folder'}; "
                                         "name a file in a folder that exists")
    return text if text == "-" else path
