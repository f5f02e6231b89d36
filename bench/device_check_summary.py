"""The summary of bench/device_check.sh: each step's outcome and each failing test, in a few
lines on stdout and in ``<date>_<gpu>_<commit>_device_check.json`` beside the benchmark record
``<date>_<gpu>_<commit>.json``, the names under which both are committed to bench/results/.

    python bench/device_check_summary.py OUT_DIR LOG_DIR
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# pytest's -rfE lines: "FAILED tests/x.py::test[a] - AssertionError: ..." and "ERROR ...".
_FAILING = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
PYTEST_STEPS = ("parity", "captured_step", "tensor_cores", "nccl", "gpu_tests")


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable: {error}"


def read_steps(logs: Path) -> dict[str, dict]:
    """steps.txt lines ``name status exit_code limit_s elapsed_s`` as a dict per step."""
    steps = {}
    for line in (logs / "steps.txt").read_text().splitlines():
        name, status, code, limit, elapsed = line.split()
        log = logs / f"{name}.log"
        steps[name] = {
            "status": status,
            "passed": status == "passed",
            "exit_code": int(code),
            "limit_s": int(limit),
            "elapsed_s": int(elapsed),
            "last_lines": log.read_text(errors="replace").splitlines()[-3:] if log.exists() else [],
        }
    return steps


def failing_tests(log: Path) -> list[str]:
    """The tests pytest's short summary names as failed or erroring, with their message."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = _FAILING.match(line.strip())
        if match:
            found.append(f"{match.group(1)} {match.group(2)}: {(match.group(3) or '')[:200]}")
    return found


def gpu_slug(gpu: str) -> str:
    """'NVIDIA H200, 570.1, 143771 MiB' -> 'nvidia-h200'; no GPU -> 'no-gpu'."""
    name = gpu.split(",")[0].strip() if gpu and "unavailable" not in gpu else ""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "no-gpu"


def main(out_dir: str, log_dir: str) -> int:
    out, logs = Path(out_dir), Path(log_dir)
    steps = read_steps(logs)
    for name in PYTEST_STEPS:
        if name in steps:
            steps[name]["failing_tests"] = failing_tests(logs / f"{name}.log")
    # The device copy of the tree may have no .git: the caller passes the commit in.
    commit = os.environ.get("GPUBACKPROP_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    gpu = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    stem = f"{datetime.date.today().isoformat()}_{gpu_slug(gpu)}_{commit[:8]}"
    summary = {
        "kind": "device_check",
        "commit": commit,
        "gpu": gpu,
        "benchmark_record": f"{stem}.json",
        "steps": steps,
    }
    sweep = out / "gemm_sweep.json"
    if sweep.exists():
        summary["gemm_sweep"] = json.loads(sweep.read_text())
    bench = out / "bench.json"
    if bench.exists():
        bench.replace(out / f"{stem}.json")
    (out / f"{stem}_device_check.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"device check of {commit[:8]} on {gpu or 'no GPU'}: {stem}_device_check.json")
    for name, step in steps.items():
        code, elapsed = step["exit_code"], step["elapsed_s"]
        print(f"  {name:<11} {step['status']:<11} exit {code:>4}  {elapsed:>4} s")
        tests = step.get("failing_tests", [])
        for test in tests[:25]:
            print(f"      {test}")
        if len(tests) > 25:
            print(f"      ... and {len(tests) - 25} more (all of them in the JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
