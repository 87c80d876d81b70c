#!/usr/bin/env bash
# Everything that waits for a GPU, in one command for a bare H100/H200 with torch, triton and
# transformers preinstalled (written for torch 2.11 / triton 3.6 / transformers 5.17, Python
# 3.12; nothing is installed, nothing is downloaded). Run from anywhere:
#
#   bash bench/run_gpu.sh            # on the GPU machine: CSVs in bench/results/
#   bash bench/run_gpu.sh --dry-run  # the same steps on the CPU with tiny shapes (Triton
#                                    # interpreter), CSVs in a temporary folder; about 3 min
#
# Steps, most important figures first (bench/README.md lists them with their budgets):
#   1. fused visual attention vs flash / SDPA / chunked / eager  (bench/visual_attention.py)
#   2. the same with a Gemma-3 sliding window of 1024            (--window 1024)
#   2b. the same at head dim 256 (Gemma 3 4B/12B), global and windowed (--head-dim 256)
#   3. one distillation step of a Qwen2.5-VL 7B -> 3B pair        (bench/model_step.py --family)
#   4. the compiled-kernel accuracy tests                         (tests/test_gpu.py)
#   5. fused linear logit KD, the Qwen2 text model step, the deterministic mode's cost
#   6. the teacher-cache benchmark (CPU-only code; a small demo pair is trained first)
# Every step has a ceiling (timeout) and the whole script one more (RUN_GPU_BUDGET_S, 450 s
# by default): when it is spent the remaining steps are skipped, so it ends within 8 minutes.
# The register/spill report needs no GPU: python -m compodistill.kernels.report (CPU).
#
# Exit status: 1 when the accuracy tests fail or a step fails or times out, 2 on bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}   # the interpreter with torch, triton and transformers

DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run_gpu.sh: unknown option '$1' (expected --dry-run or nothing)" >&2; exit 2 ;;
esac

if [ "$DRY" = 1 ]; then
    DEV=cpu
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/run_gpu_dry.XXXXXX")
    export TRITON_INTERPRET=1     # the Triton providers run, slowly, in the interpreter
    TOTAL=${RUN_GPU_BUDGET_S:-200}
else
    DEV=cuda
    OUT=bench/results
    unset TRITON_INTERPRET
    TOTAL=${RUN_GPU_BUDGET_S:-450}
fi
mkdir -p "$OUT"
START=$(date +%s)
FAILED=()
step() { printf '\n=== [%s, %ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }

# run NAME CEILING_S CMD...: CMD under min(CEILING_S, what is left of TOTAL); SIGINT first
# (Python unwinds and prints where it was), SIGKILL 10 s later.
run() {
    local name=$1 ceiling=$2 left limit rc
    shift 2
    left=$(( TOTAL - ($(date +%s) - START) ))
    limit=$(( ceiling < left ? ceiling : left ))
    step "$name (limit ${limit}s)"
    if [ "$limit" -lt 15 ]; then
        echo "SKIPPED: the ${TOTAL}s budget is spent"
        FAILED+=("$name: skipped")
        return 0
    fi
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "TIMED OUT after ${limit}s: $name"
        FAILED+=("$name: timed out after ${limit}s")
    elif [ "$rc" -ne 0 ]; then
        echo "FAILED (exit $rc): $name"
        FAILED+=("$name: exit $rc")
    fi
    return 0
}

if [ "$DRY" = 1 ]; then
    VA_SIZES="32"; VA_WINDOW=8; VA_WINDOW_SIZES="32"; VA_D256_SIZES="32"; FAMILY_SHAPES="1x128"
    KD_TOKENS="64"; STEP_SHAPES="1x64"; REPEAT=1
else
    VA_SIZES="1024 4096"; VA_WINDOW=1024; VA_WINDOW_SIZES="4096 8192"; VA_D256_SIZES="4096"
    FAMILY_SHAPES=""
    KD_TOKENS="2048 8192"; STEP_SHAPES="1x2048"; REPEAT=3
fi

run "environment" 30 "$PYTHON" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE (CPU)")
for name in ("triton", "transformers", "accelerate", "peft", "safetensors", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # the steps that need it will fail; say which now
        print(f"{name} MISSING ({type(err).__name__})")
EOF

# shellcheck disable=SC2086  # the size lists are meant to split
run "visual attention: fused vs flash/SDPA/chunked/eager" 80 \
    "$PYTHON" bench/visual_attention.py --device "$DEV" --sizes $VA_SIZES --repeat "$REPEAT" \
    --out "$OUT/visual_attention.csv"
# shellcheck disable=SC2086
run "visual attention, sliding window $VA_WINDOW (Gemma 3)" 70 \
    "$PYTHON" bench/visual_attention.py --device "$DEV" --sizes $VA_WINDOW_SIZES \
    --window "$VA_WINDOW" --repeat "$REPEAT" --out "$OUT/visual_attention.csv"
# shellcheck disable=SC2086
run "visual attention, head dim 256 (Gemma 3)" 35 \
    "$PYTHON" bench/visual_attention.py --device "$DEV" --sizes $VA_D256_SIZES --head-dim 256 \
    --repeat "$REPEAT" --out "$OUT/visual_attention.csv"
# shellcheck disable=SC2086
run "visual attention, head dim 256 (Gemma 3), sliding window $VA_WINDOW" 35 \
    "$PYTHON" bench/visual_attention.py --device "$DEV" --sizes $VA_D256_SIZES --head-dim 256 \
    --window "$VA_WINDOW" --repeat "$REPEAT" --out "$OUT/visual_attention.csv"
# shellcheck disable=SC2086
run "model step: Qwen2.5-VL 7B -> 3B shapes" 120 \
    "$PYTHON" bench/model_step.py --family qwen2_5_vl --device "$DEV" \
    ${FAMILY_SHAPES:+--shapes $FAMILY_SHAPES} --repeat 2 --out "$OUT/model_step.csv"

run "compiled-kernel accuracy tests (tests/test_gpu.py)" 110 \
    "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x

# shellcheck disable=SC2086
run "fused linear logit KD" 30 \
    "$PYTHON" bench/logit_kd.py --device "$DEV" --tokens $KD_TOKENS --repeat "$REPEAT" \
    --out "$OUT/logit_kd.csv"
# shellcheck disable=SC2086
run "model step: Qwen2 text models" 40 \
    "$PYTHON" bench/model_step.py --device "$DEV" --shapes $STEP_SHAPES --repeat 2 \
    --out "$OUT/model_step.csv"
if [ "$DRY" = 1 ]; then
    run "deterministic mode (CUDA only: --help here)" 30 "$PYTHON" bench/determinism.py --help
else
    run "deterministic mode: tuned vs pinned configs" 30 \
        "$PYTHON" bench/determinism.py --sizes 1024 4096 --out "$OUT/determinism.csv"
fi

DEMO=$(mktemp -d "${TMPDIR:-/tmp}/run_gpu_demo.XXXXXX")
run "teacher cache: small demo pair (CPU)" 60 \
    "$PYTHON" -c 'import sys; from compodistill.cli import main; sys.exit(main())' demo \
    --out "$DEMO" --quiet --num-images 32 --eval-images 8 --teacher-steps 10 \
    --teacher-batch-size 8 --student-warmup-steps 2 --dpt-steps 1 --dft-steps 1 \
    --sft-steps 1 --batch-size 8
run "teacher cache benchmark (CPU)" 60 \
    "$PYTHON" bench/teacher_cache.py --demo "$DEMO" --samples 16 --repeat 2 \
    --out "$OUT/teacher_cache.csv"
rm -rf "$DEMO"

step "done in $(( $(date +%s) - START ))s; CSVs in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'not complete:\n'
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
