#!/usr/bin/env bash
# One call on a GPU machine: device facts, the parity suite on "cupy", compute-sanitizer
# memcheck and racecheck over every kernel, and the quick benchmarks.  Logs and a JSON
# summary go to the folder given as $1, or $OUT.  Designed to finish in under 8 minutes.
#   device tool:  GPUBACKPROP_COMMIT=<sha> bash bench/device_check.sh   (PYTHONPATH=. is set here)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/device_check_out}}"
mkdir -p "$out"
# The device tool returns at most 8 files: step logs go to a scratch folder and come back as one
# archive, beside summary.json, bench.json and bench.png.
logs="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log, record the exit code
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" >>"$logs/steps.txt"
    tail -n 5 "$logs/$name.log"
}
: >"$logs/steps.txt"
nvidia-smi >"$logs/nvidia-smi.log" 2>&1
# Step limits add up to 470 s, inside the 8 minutes this check promises.
step info 20 python3 -m gpubackprop.cli info
# GPUBACKPROP_REQUIRE_GPU turns "cupy unavailable" from a skip into a failure.
# --maxfail rather than -x: on a first run one failure must not hide which others fail.
step parity 110 env GPUBACKPROP_REQUIRE_GPU=1 python3 -m pytest -q -rfE -m gpu tests/test_parity.py --maxfail=25 -p no:cacheprovider
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)
if [ -n "$sanitizer" ]; then
    step memcheck 55 "$sanitizer" --tool memcheck --error-exitcode 3 python3 bench/run_all_kernels.py
    step racecheck 65 "$sanitizer" --tool racecheck --error-exitcode 3 python3 bench/run_all_kernels.py
else
    echo "memcheck 127 0" >>"$logs/steps.txt"; echo "compute-sanitizer not found" >"$logs/memcheck.log"
fi
step gemm_sweep 110 python3 bench/gemm_sweep.py --size 4096 --repeats 10 --json "$out/gemm_sweep.json"
# torch.compile is off here: its compile time is unbounded and would put the time limit at risk.
# Only the GPU backend: the CPU rows are measured on any machine, device time is scarce.  --json
# is rewritten after every row, so a step stopped by its limit still returns what it measured.
step bench 110 python3 -m gpubackprop.cli bench --quick --backend cupy --torch-compile off --json "$out/bench.json" --plot "$out/bench.png"
python3 - "$out" "$logs" <<'PY'
import json, os, pathlib, subprocess, sys
out, logs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
steps = {}
for line in (logs / "steps.txt").read_text().splitlines():
    name, rc, elapsed = line.split()
    steps[name] = {"exit_code": int(rc), "elapsed_s": int(elapsed), "passed": rc == "0"}
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as error:
        return f"unavailable: {error}"
summary = {
    "kind": "device_check",
    # The device copy of the tree may have no .git: the caller can pass the commit in.
    "commit": os.environ.get("GPUBACKPROP_COMMIT") or run(["git", "rev-parse", "HEAD"]),
    "gpu": run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
    "steps": steps,
    "parity_tail": (logs / "parity.log").read_text().splitlines()[-40:]
    if (logs / "parity.log").exists() else [],
}
sweep = out / "gemm_sweep.json"
if sweep.exists():
    summary["gemm_sweep"] = json.loads(sweep.read_text())
bench = out / "bench.json"
if bench.exists():
    summary["bench"] = json.loads(bench.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
PY
tar -czf "$out/logs.tar.gz" -C "$logs" .
