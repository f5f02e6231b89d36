#!/usr/bin/env python3
"""Time the default ``gpubackprop train`` (numpy backend) under BLAS thread settings, on an idle
machine and beside one busy process, and record the result as JSON in bench/results/.

    python bench/blas_threads.py --repeats 5

Each setting is one fresh process (``python -m gpubackprop train --backend numpy --verbose 0``)
whose training time comes from its --metrics-json (``train_time_s``: fit only, no start-up or
data loading).  Settings: ``OPENBLAS_NUM_THREADS=1``, ``=2``, and ``unset`` (no thread
variable set: what a user gets by default).  Conditions: ``idle`` (nothing of ours running
beside it) and ``busy`` (one ``python -c "while True: pass"`` process spinning on a core).  The
settings run interleaved round by round, so slow drift of the machine's load hits them alike;
the record keeps every time, the median per cell, and the load average and CPU count seen.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# "unset": no thread variable, so what a user gets by default (OpenBLAS's own default, one
# thread per core, before gpubackprop had a policy; gpubackprop's policy since).
SETTINGS = {"1": {"OPENBLAS_NUM_THREADS": "1"}, "2": {"OPENBLAS_NUM_THREADS": "2"}, "unset": {}}


def train_time(setting: dict[str, str], extra_args: list[str]) -> float:
    """Seconds ``fit`` took in one fresh ``gpubackprop train`` process."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(setting)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as scratch:
        metrics = Path(scratch) / "metrics.json"
        command = [sys.executable, "-m", "gpubackprop", "train", "--backend", "numpy"]
        command += ["--verbose", "0", "--metrics-json", str(metrics), *extra_args]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=scratch)
        return float(json.loads(metrics.read_text())["train_time_s"])


def measure(
    condition: str, repeats: int, extra_args: list[str], settings: list[str]
) -> dict[str, list[float]]:
    busy = None
    if condition == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it reach a core
    try:
        times: dict[str, list[float]] = {name: [] for name in settings}
        for round_ in range(repeats):
            for name in settings:
                seconds = train_time(SETTINGS[name], extra_args)
                times[name].append(seconds)
                print(f"{condition:>4} round {round_ + 1} threads={name:<6} {seconds:6.2f} s")
        return times
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--conditions", default="idle,busy")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<name>")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"subset of {list(SETTINGS)}, in order"
    )
    parser.add_argument("--note", default="", help="what else ran on the machine, and so on")
    parser.add_argument("train_args", nargs="*", help="extra `gpubackprop train` arguments")
    args = parser.parse_args()
    record = {
        "what": "seconds of fit in the default `gpubackprop train` (digits, 512-256, 15 epochs, "
        "batch 64) on the numpy backend, per OpenBLAS thread setting",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "train_args": args.train_args,
        "note": args.note,
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "load_average_before": os.getloadavg(),
        "conditions": {},
    }
    for condition in args.conditions.split(","):
        times = measure(condition, args.repeats, args.train_args, args.settings.split(","))
        record["conditions"][condition] = {
            "median_s": {name: statistics.median(values) for name, values in times.items()},
            "times_s": times,
            "load_average_after": os.getloadavg(),
        }
    import numpy

    record["numpy"] = numpy.__version__
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today()}_blas_threads.json"
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for condition, entry in record["conditions"].items():
        cells = ", ".join(f"{k}: {v:.2f} s" for k, v in entry["median_s"].items())
        print(f"{condition}: median {cells}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
