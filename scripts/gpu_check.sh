#!/usr/bin/env bash
# The GPU checks in one command (issue 24 item 3): CUDA tests, syncs, step benchmarks and one CIFAR-10 epoch,
# within 8 minutes, results under results/gpu/. Without a CUDA device it says so and exits 0.
# Stages, outputs and options: scripts/gpu_check.py (e.g. --data-dir DIR, --out DIR, --plan).
set -u
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
