#!/usr/bin/env bash
# One call on a GPU machine, ordered by the value of what each step proves: the parity suite on
# "cupy", the newer GPU paths (captured steps, tensor cores, NCCL) and the other GPU tests, the
# benchmarks (training steps against PyTorch first, then the per-op rows), compute-sanitizer
# where the sandbox allows it, and last the GEMM tile sweep.  Every step has its own time limit
# and the whole check a budget (BUDGET_S, default 270 s; the sanitizer probe adds at most 15), so it ends in under 5 minutes.
#   device tool:  GPUBACKPROP_COMMIT=<sha> bash bench/device_check.sh   (PYTHONPATH=. is set here)
# Files under $1 (or $OUT): <date>_<gpu>_<commit>_device_check.json (the summary: each step's
# outcome, each failing test), <date>_<gpu>_<commit>.json (the benchmark record), gemm_sweep.json,
# bench.png and logs.tar.gz (every step's log): copy the first two into bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/device_check_out}}"
mkdir -p "$out"
logs="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget="${BUDGET_S:-270}"
start=$(date +%s)
: >"$logs/steps.txt"

record() {  # record NAME STATUS EXIT_CODE LIMIT_S ELAPSED_S: one line of steps.txt
    echo "$1 $2 $3 $4 ${5:-0}" >>"$logs/steps.txt"
}

step() {  # step NAME LIMIT_S COMMAND...: run within min(LIMIT_S, what is left of the budget)
    local name=$1 limit=$2; shift 2
    local left=$(( budget - ($(date +%s) - start) ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        echo "not run: the check's ${budget} s budget was spent" >"$logs/$name.log"
        record "$name" not_run -1 0
        return
    fi
    echo "== $name (limit ${limit}s)"
    local began=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$logs/$name.log" 2>&1
    local rc=$? status=failed
    (( rc == 0 )) && status=passed
    (( rc == 5 )) && status=no_tests  # pytest selected no test: nothing proven, nothing failed
    (( rc == 124 || rc == 137 )) && status=timed_out
    record "$name" "$status" "$rc" "$limit" $(( $(date +%s) - began ))
    tail -n 3 "$logs/$name.log"
}

nvidia-smi >"$logs/nvidia-smi.log" 2>&1
step info 10 python3 -m gpubackprop.cli info
# Every kernels/ module compiled once, in parallel processes, into CuPy's disk cache: the steps
# after it load them instead of compiling one after another inside their own time limits.
step warm 40 python3 -m gpubackprop.backends.warm --backend cupy
# GPUBACKPROP_REQUIRE_GPU turns a skipped gpu test (cupy unavailable) into a failure.
# --maxfail rather than -x: on a first run one failure must not hide which others fail.
pytest_gpu=(env GPUBACKPROP_REQUIRE_GPU=1 COLUMNS=240 python3 -m pytest -q -rfE -m gpu --maxfail=25 -p no:cacheprovider)
step parity 55 "${pytest_gpu[@]}" tests/test_parity.py
# The newer GPU paths, each a short step of its own: its gpu-marked tests in the files named
# (a path whose files are not there yet, or hold no gpu test, is recorded as "no_tests").
path_files() { local f; for f in "$@"; do [ -f "$f" ] && echo "$f"; done; }
path_step() {  # path_step NAME LIMIT_S FILE...
    local name=$1 limit=$2; shift 2
    local files; mapfile -t files < <(path_files "$@")
    if (( ${#files[@]} == 0 )); then
        echo "none of these files exists yet: $*" >"$logs/$name.log"; record "$name" no_tests 5 0
        return
    fi
    step "$name" "$limit" "${pytest_gpu[@]}" "${files[@]}"
}
path_step captured_step 20 tests/test_compiled_step.py tests/test_gemm_plan.py
path_step tensor_cores 40 tests/test_gemm_mma.py tests/test_mixed_precision.py tests/test_ptx_twins.py
# nccl: the one-rank all-reduce and broadcast, and the captured data-parallel step (the NCCL
# all-reduce inside the CUDA graph) against the eager one; a missing NCCL fails with the pip hint.
path_step nccl 25 tests/test_distributed.py
# Every other GPU test (placement, interop, checkpoints, emulator conformance kernels).
step gpu_tests 40 "${pytest_gpu[@]}" tests --ignore=tests/test_parity.py \
    --ignore=tests/test_compiled_step.py --ignore=tests/test_gemm_plan.py \
    --ignore=tests/test_gemm_mma.py --ignore=tests/test_mixed_precision.py \
    --ignore=tests/test_ptx_twins.py --ignore=tests/test_distributed.py
# torch.compile is off: its compile time is unbounded.  Rows run training steps first, then the
# GEMMs and the rest; --json is rewritten after every row, so a stopped step keeps its rows.
step bench 60 python3 -m gpubackprop.cli bench --quick --backend cupy --torch-compile off \
    --json "$out/bench.json" --plot "$out/bench.png"

# compute-sanitizer: sandboxed runtimes refuse it ("Device not supported", then error 999).  A
# probe of a few seconds tells; a refusal is recorded as "unavailable", not as a kernel failure.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)
if [ -z "$sanitizer" ]; then
    for tool in memcheck racecheck; do
        echo "compute-sanitizer not found" >"$logs/$tool.log"; record "$tool" unavailable 127 0
    done
elif ! timeout -k 2 15 "$sanitizer" --tool memcheck --error-exitcode 3 \
        python3 -c "import cupy; assert int(cupy.arange(8).sum()) == 28" >"$logs/sanitizer_probe.log" 2>&1; then
    for tool in memcheck racecheck; do
        cp "$logs/sanitizer_probe.log" "$logs/$tool.log"; record "$tool" unavailable 125 0
    done
else
    step memcheck 25 "$sanitizer" --tool memcheck --error-exitcode 3 python3 bench/run_all_kernels.py
    step racecheck 25 "$sanitizer" --tool racecheck --error-exitcode 3 python3 bench/run_all_kernels.py
fi
# Last: the tile sweep (each version's library default first; rows written as they are timed).
step gemm_sweep 45 python3 bench/gemm_sweep.py --size 4096 --repeats 10 --budget-s 40 \
    --json "$out/gemm_sweep.json"

python3 bench/device_check_summary.py "$out" "$logs"
tar -czf "$out/logs.tar.gz" -C "$logs" .
