#!/usr/bin/env bash
# Nsight Compute on dwfast's kernels for one shape (CUDA only).
#
#   bash bench/ncu.sh                                   # defaults: train, bf16, 1e6 params, depth 8, batch 4096
#   bash bench/ncu.sh --depth 32 --batch 8192 --dtype fp16   # any `python -m bench.profile` flag
#   NCU_SET=basic NCU_OUT=/tmp/ncu bash bench/ncu.sh    # lighter section set, other folder
#
# It runs one step of dwfast inside an NVTX range named "dwfast" (bench.profile --nvtx-only, after
# untimed warm-up steps so compilation and autotuning are not profiled) and profiles only the
# kernels launched inside that range. Open the report with `ncu-ui <file>.ncu-rep`, or print it
# with `ncu --import <file>.ncu-rep --page details`. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${NCU_OUT:-bench/results/ncu}"
mkdir -p "$out"
report="$out/dwfast_$(date +%Y%m%dT%H%M%S)"
ncu --nvtx --nvtx-include "dwfast/" --set "${NCU_SET:-full}" --target-processes all -f -o "$report" \
    "${PYTHON:-python3}" -m bench.profile --impls dwfast --nvtx-only "$@"
echo "wrote $report.ncu-rep"
