#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one Markdown table of train-step time, peak memory, compiled vs eager outputs
# and predict time per case of stock, nnUNetTrainerDiff and nnUNetTrainerDiffRecycle (predicted: recycling
# fine-tuned from stock, at its 1-step default).
# usage: bash bench/gpu_check.sh [--data MSD_HIPPOCAMPUS] [--workdir DIR] [--cpu-smoke] [--repeats N] [--cases N]
set -euo pipefail
exec python "$(dirname "$0")/gpu_check.py" "$@"
