#!/usr/bin/env bash
# Everything that waits for a GPU, in one short command for a bare H100/H200 with torch and
# triton preinstalled (torch 2.11 / triton 3.6; nothing is installed; liger-kernel optional).
# Run from anywhere: bash bench/run_gpu.sh   (under 7 minutes: every step has a ceiling)
# The register/spill report needs no GPU: python -m compodistill.kernels.report (CPU).
#
#   1. the compiled-kernel tests (tests/test_gpu.py: accuracy rule, backend asserted)
#   2. the benchmarks at sizes small enough for the budget; each appends rows with device,
#      date, versions and git commit to bench/results/*.csv
#
# Exit status: non-zero when any accuracy test fails (the benchmarks only report).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results
step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
budget() { timeout --signal=INT "$@"; }  # each step has its own ceiling

step "environment"
python - <<'EOF'
import torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF

step "compiled-kernel tests (tests/test_gpu.py)"
budget 200 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x; tests=$?
[ "$tests" -ne 0 ] && echo "ACCURACY FAILURE (exit $tests)"

step "benchmarks (small sizes)"
budget 60 python bench/visual_attention.py --device cuda --sizes 1024 4096 --repeat 3 \
    || echo "visual_attention failed"
budget 45 python bench/logit_kd.py --device cuda --tokens 1024 4096 --repeat 3 \
    || echo "logit_kd failed"
budget 45 python bench/model_step.py --device cuda --shapes 1x2048 --repeat 2 \
    || echo "model_step failed"
budget 45 python bench/determinism.py --sizes 1024 4096 || echo "determinism failed"

step "done: tests exit $tests; CSVs under bench/results/"
exit "$tests"
