#!/usr/bin/env bash
# The one script to run on a lent GPU box (no internet; it has torch, triton, pytest, pytest-benchmark, pybind11, cmake,
# ninja). From the repository root:
#
#     OUT=/where/results/go bash benchmarks/run_gpu.sh                 # install, GPU tests, benchmarks
#     OUT=... bash benchmarks/run_gpu.sh bench                         # only some stages: install | tests | bench
#     OUT=... VPO_BENCH_ARGS='-k "llava"' bash benchmarks/run_gpu.sh bench    # extra pytest arguments
#     VPO_BENCH_ARGS='-k "kl or catpo or attention"'     only the Cat-PO benchmarks (token KL, Cat-PO loss, image attention)
#     VPO_BENCH_ARGS='-k "not N16384"'                   without the largest LM-head shapes
#     VPO_BENCH_ALL_SHAPES=1                             also the token-KL / Cat-PO torch paths above N=2048 (minutes)
#     OUT=... bash benchmarks/run_gpu.sh install train   the end-to-end DPO/TPO training step on a LLaVA-1.5-7B-shaped
#                                                        model (bench_train_step.py, ~1-2 min; not a default stage: the
#                                                        others use the whole budget), into $OUT/train-step.{json,md}
#
# Writes into $OUT: nvidia-smi.txt, install.log, gpu_tests.log, bench.log and the results files <device>.json and
# <device>.md (benchmarks/conftest.py; rewritten after every benchmark, so a run cut short keeps what it measured).
# Time: the whole run is meant to fit in ~9 minutes. Each stage runs under `timeout` (SIGINT first, so pytest still
# writes its results); the benchmarks get whatever is left of VPO_TOTAL_BUDGET_S after the install and the tests.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
TOTAL=${VPO_TOTAL_BUDGET_S:-540}          # seconds for all stages together
TESTS_BUDGET=${VPO_TESTS_BUDGET_S:-180}   # at most this much for `pytest -m gpu tests`
TRAIN_BUDGET=${VPO_TRAIN_BUDGET_S:-240}   # at most this much for the `train` stage
STAGES=${*:-install tests bench}
mkdir -p "$OUT"
start=$SECONDS
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( TOTAL - (SECONDS - start) )); }

{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tee "$OUT/versions.txt"

if has install; then
    echo "== install ($(left)s left)"
    "$PY" -m pip install -e . --no-build-isolation --no-deps > "$OUT/install.log" 2>&1
    echo "pip exit $?"; tail -n 3 "$OUT/install.log"
    "$PY" -c "import vpo; print('vpo.AVAILABLE', vpo.AVAILABLE)" 2>&1 | tee -a "$OUT/install.log"
fi

if has tests; then
    budget=$(( $(left) < TESTS_BUDGET ? $(left) : TESTS_BUDGET ))
    echo "== gpu tests (budget ${budget}s)"
    timeout -s INT -k 20 "$budget" "$PY" -m pytest -m gpu -q tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
fi

if has train; then
    budget=$(( $(left) < TRAIN_BUDGET ? $(left) : TRAIN_BUDGET ))
    echo "== train step (budget ${budget}s)"
    timeout -s INT -k 30 "$budget" "$PY" -m pytest benchmarks/bench_train_step.py --benchmark-only -q \
        -p no:cacheprovider --vpo-results "$OUT" --vpo-results-name train-step 2>&1 | tee "$OUT/train_step.log" \
        | tail -n 15
fi

if has bench; then
    budget=$(( $(left) - 15 )); (( budget < 60 )) && budget=60
    echo "== benchmarks (budget ${budget}s)"
    # Bounded timing: at least 3 rounds, more only while the first 0.5 s last; each benchmark also runs one warm-up
    # step and one peak-memory step itself before pytest-benchmark's calibration call.
    eval "timeout -s INT -k 30 $budget $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
        --ignore=benchmarks/bench_train_step.py \
        --vpo-results '$OUT' --benchmark-min-rounds=3 --benchmark-max-time=0.5 --benchmark-warmup=off \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name ${VPO_BENCH_ARGS:-}" 2>&1 | tee "$OUT/bench.log" \
        | tail -n 15
    ls -l "$OUT"
fi
echo "== done in $(( SECONDS - start ))s"
