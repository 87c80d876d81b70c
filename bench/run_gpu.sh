#!/usr/bin/env bash
# Everything that waits for a GPU, in one command (run from the repository root on a CUDA
# machine with torch/triton preinstalled): the compiled-kernel tests, then the benchmarks,
# which append rows with device, date, versions and git commit to bench/results/*.csv and
# redraw the plots.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider; tests=$?
python bench/attention_loss.py --device cuda --plot
python bench/logit_kd.py --device cuda --plot
python bench/model_step.py --device cuda --plot
python bench/determinism.py
exit $tests
