#!/usr/bin/env bash
# The GPU kit in one command: tests, compute-sanitizer, tile tuning, the key sweep and ncu, at
# most 9 minutes on an H100, files in OUTDIR (see `python -m bench gpu --help`).
#
#   bash bench/gpu.sh OUTDIR              # on a machine with a CUDA GPU
#   bash bench/gpu.sh OUTDIR --dry-run    # the same steps at tiny sizes on the CPU
#
# On a bare machine with torch and triton but no network, it first installs this checkout
# (no dependencies, no build isolation). PYTHON picks the interpreter (default python3).
set -euo pipefail
python="${PYTHON:-python3}"
if ! "$python" -c "import dwfast.kernels, bench" 2>/dev/null; then
    (cd "$(dirname "$0")/.." && "$python" -m pip install -q --no-deps --no-build-isolation -e .)
fi
exec "$python" -m bench gpu "$@"
