#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one command (CI has no GPU; see README "GPU checks").
#
#   bash scripts/gpu_checks.sh [STEP ...]      STEP in: install tests linalg-bench lowrank-bench compile-bench
#                                              profile (default: all but profile, in that order)
#
# Logs and results go to ${OUT:-gpu_out}/ (log.txt, results.tgz with the benchmark JSON files).
# Every step runs under `timeout` so that one slow step cannot lose the others' output; the
# timeouts can be raised through the environment (T_TESTS, T_LINALG, T_LOWRANK, T_COMPILE).
# Assumes a CUDA build of torch, triton, nvcc and ninja on PATH (python3 is the one with torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/log.txt"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(install tests linalg-bench lowrank-bench compile-bench)
status=0

say() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
run() {  # run SECONDS CMD...: one step, logged, never longer than SECONDS
    local limit=$1; shift
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { echo "!! exit $rc: $*" | tee -a "$LOG"; status=1; }
    return 0
}

for step in "${steps[@]}"; do
    case $step in
    install)
        say "install: lrcomp (editable, no deps) and the CUDA extension lrcomp._C"
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
        LRCOMP_SKIP_CUDA_BUILD=1 run 300 python3 -m pip install -q --no-build-isolation --no-deps -e .
        MAX_JOBS=${MAX_JOBS:-16} run 600 python3 setup.py -q build_ext --inplace
        run 60 python3 -c "import lrcomp; print('has_cuda_ext:', lrcomp.has_cuda_ext())"
        ;;
    tests)
        say "tests: Triton kernels on CUDA (one config per schedule unless LRCOMP_AUTOTUNE=1), CUDA extension"
        LRCOMP_AUTOTUNE=${LRCOMP_AUTOTUNE:-0} run "${T_TESTS:-420}" python3 -m pytest -q -p no:cacheprovider -rs \
            tests/kernels tests/linalg/test_csrc_gpu.py
        ;;
    linalg-bench)
        say "benchmarks: rsvd and covariance accumulation"
        run "${T_LINALG:-240}" python3 benchmarks/bench_rsvd.py
        run "${T_LINALG:-240}" python3 benchmarks/bench_covariance.py
        ;;
    lowrank-bench)
        say "benchmark: low-rank linear, Triton vs eager vs dense (bf16, Llama-2-7B shapes)"
        for shape in 4096x4096 4096x11008 11008x4096; do
            run "${T_LOWRANK:-300}" python3 benchmarks/bench_lowrank_linear.py --lane gpu --shapes "$shape" \
                --impls triton eager dense --out "benchmarks/results/lowrank_linear_gpu_$shape.json"
        done
        ;;
    compile-bench)
        say "benchmark: low-rank linear, Triton vs torch.compile of the eager two-GEMM (subset of M)"
        run "${T_COMPILE:-300}" python3 benchmarks/bench_lowrank_linear.py --lane gpu --shapes 4096x4096 \
            --ms 1 16 2048 --impls triton compile --out benchmarks/results/lowrank_linear_gpu_compile.json
        ;;
    profile)
        say "profile: where one low-rank linear call spends its time (Triton vs eager, decode shape)"
        run 300 python3 benchmarks/bench_lowrank_linear.py --lane gpu --profile --shapes 4096x4096 --ranks 256 \
            --ms 1 --passes fwd --impls triton eager dense
        ;;
    *)
        echo "unknown step $step (install tests linalg-bench lowrank-bench compile-bench profile)" >&2
        exit 2
        ;;
    esac
    tar czf "$OUT/results.tgz" benchmarks/results 2>/dev/null  # after every step: a later kill keeps it
done
say "done, status $status"
exit $status
