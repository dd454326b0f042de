#!/usr/bin/env bash
# The one command to run on a lent H100/H200 (no internet; the image has torch, triton, transformers, peft, pybind11,
# scikit-build-core, cmake, ninja, pytest, pytest-benchmark). From anywhere:
#
#     OUT=/where/results/go bash benchmarks/run_gpu.sh
#     VPO_GPU_SMOKE=1 OUT=/tmp/x bash benchmarks/run_gpu.sh    # CPU smoke test of the plumbing (tests/test_gpu_script.py)
#
# Stages, in order of importance, each under `timeout` within a total of VPO_GPU_TOTAL_S (330 s: with the kill grace
# periods the whole run, the install included, ends within 6 minutes); a stage that fails or runs out of time leaves the others' results:
#   1. install   python3 -m pip install -e . --no-build-isolation --no-deps (CUDA sources for this GPU's arch only, ≤ 100 s);
#                if it fails, vpo still imports from the source tree (PYTHONPATH), without its C++ extension
#   2. lmhead    log-probs fwd+bwd at N ∈ {4096, 16384}, D=3584, V=152064, bf16: GEMM floor, materialized logits,
#                impl="gemm", impl="triton" (+ a check of vpo's values and gradients against the materialized ones)
#   3. losses    fused DPO and TPO (gemm, triton) vs the materializing oracles and the 4-GEMM floor
#   4. tests     pytest -m gpu tests (quiet; its summary goes into the report)
#   5. extras    fused Cat-PO, Cat-PO's image-attention statistics (LLaVA-1.5-7B shape), the per-token KL
# Stages 2, 3 and 5 are benchmarks/gpu_ab.py, one process each; a CUDA error that poisons the process's context makes
# it exit 3 and the stage is started again (it skips what was already attempted) while its time lasts.
#
#   0. model     python -m benchmarks.model at the losses' shapes, in the background from the start (CPU only, niced):
#                model.json; printed at the end and shown next to the measured times in the report
# Writes 6 files into $OUT: gpu-report.md (the device, versions, every number and ratio, errors, the pytest summary,
# model vs measurement), gpu-results.json (raw: every timing, peak memory, input statistics), model.json, run.log (this
# script's output), install.log, pytest-gpu.log. The report is rewritten after every stage.
set -uo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the results directory}"
mkdir -p "$OUT"
PY=python3
SMOKE=${VPO_GPU_SMOKE:-0}
TOTAL=${VPO_GPU_TOTAL_S:-330}
DRIVER=(benchmarks/gpu_ab.py)
if [ "$SMOKE" = 1 ]; then
    DRIVER+=(--cpu-smoke)
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # vpo imports from the tree even if the install fails
start=$SECONDS

left() { echo $(( TOTAL - (SECONDS - start) )); }
# budget CAP RESERVE: at most CAP seconds, leaving RESERVE for the stages after this one (never below 5)
budget() { local b=$(( $(left) - $2 )); (( b > $1 )) && b=$1; (( b < 5 )) && b=5; echo "$b"; }
note() { "$PY" "${DRIVER[@]:0:1}" note --out "$OUT" --text "$*"; }
report() { "$PY" "${DRIVER[@]}" report --out "$OUT" || echo "report failed (rc $?)"; }

driver_stage() {  # driver_stage NAME CAP RESERVE: the driver, restarted after a poisoned CUDA context (exit 3)
    local name=$1 cap=$2 reserve=$3 t0=$SECONDS rc=0 try b
    for try in 1 2 3; do
        b=$(budget $(( cap - (SECONDS - t0) )) "$reserve")
        (( b < 10 )) && break
        echo "== $name (try $try, ${b}s)"
        timeout -k 5 "$b" "$PY" "${DRIVER[@]}" run --stage "$name" --out "$OUT" --deadline "$(( $(date +%s) + b - 5 ))"
        rc=$?
        (( rc == 3 )) || break
    done
    note "$name: rc $rc after $(( SECONDS - t0 )) s$( (( rc == 124 )) && echo ' (timed out; its results so far are kept)')"
    report
}

main() {
echo "== vpo GPU run: $(date -u +%FT%TZ), budget ${TOTAL}s, OUT=$OUT, smoke=$SMOKE"
{ nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true; } 2>&1

# 0. the performance model (CPU only: meta-device tracing), in the background at low priority while the GPU stages run,
#    at the shapes the losses stage measures; printed at the end and put next to the measurements in the report
if [ "$SMOKE" = 1 ]; then model_args=(--head 32,256 --ns 32,64 --seq 16); else model_args=(--head 3584,152064 --ns 4096,16384); fi
nice -n 10 timeout -k 5 "$(budget 240 0)" "$PY" -m benchmarks.model "${model_args[@]}" --json "$OUT/model.json" \
    > /dev/null 2>&1 &
model_pid=$!

# 1. install
t0=$SECONDS
if [ "$SMOKE" = 1 ]; then
    echo "smoke test: install skipped" > "$OUT/install.log"
    rc=0
else
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
    b=$(budget 100 225)
    echo "== install (${b}s, CUDA arch ${arch:-80;90})"
    VPO_CUDA_ARCHS=${arch:-80;90} timeout -k 5 "$b" "$PY" -m pip install -e . --no-build-isolation --no-deps \
        > "$OUT/install.log" 2>&1
    rc=$?
    tail -n 3 "$OUT/install.log"
fi
note "install: rc $rc after $(( SECONDS - t0 )) s"

# 2.-3. the LM-head A/B and the fused losses
driver_stage lmhead 95 130
driver_stage losses 70 60

# 4. the GPU tests
t0=$SECONDS
b=$(budget 55 5)
echo "== pytest -m gpu (${b}s)"
if [ "$SMOKE" = 1 ]; then tests=(tests/test_segment_sum.py); else tests=(tests); fi
timeout -s INT -k 10 "$b" "$PY" -m pytest -m gpu -q -p no:cacheprovider --tb=short -rfEs "${tests[@]}" \
    > "$OUT/pytest-gpu.log" 2>&1
rc=$?
tail -n 3 "$OUT/pytest-gpu.log"
note "pytest -m gpu: rc $rc after $(( SECONDS - t0 )) s$( (( rc == 124 )) && echo ' (timed out)')"
report

# 5. whatever time is left
if (( $(left) > 20 )); then
    driver_stage extras $(( $(left) - 8 )) 0
else
    note "extras: not run ($(left) s left)"
    report
fi
# the model next to the measurements (the report's "Model vs measurement" table)
wait "$model_pid"
rc=$?
note "model: rc $rc ($(( SECONDS - start )) s since the start)"
echo "== model (python -m benchmarks.model ${model_args[*]}): a roofline estimate, not a measurement"
"$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["text"])' "$OUT/model.json" 2>/dev/null \
    || echo "no model output (rc $rc)"
report
echo "== done in $(( SECONDS - start ))s; files in $OUT:"
ls -l "$OUT"
}

main 2>&1 | tee -a "$OUT/run.log"
