"""bench/device_check.sh, run on this machine: the plumbing a GPU session depends on.

A GPU session has minutes of device time for one call of the script, so the script itself must
not be what fails.  Without a GPU every GPU step fails quickly; what is checked here is that each
step is run and recorded with its status, exit code and time, and that the summary, the bench
record, gemm_sweep.json and logs.tar.gz come back.  (Where a GPU is present the script is the real
check, run on its own; this test would take its full five minutes, so it leaves it to that.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from gpubackprop.backends import available_backends

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"

pytestmark = [
    pytest.mark.skipif(not SCRIPT.is_file(), reason="not a source checkout"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="no bash"),
    pytest.mark.skipif(
        available_backends()["cupy"][0], reason="a GPU is present: run bench/device_check.sh"
    ),
]


def test_device_check_runs_every_step_and_returns_its_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPUBACKPROP_COMMIT="0123456789abcdef", PATH=os.environ["PATH"])
    # A compute-sanitizer that refuses the device, as sandboxed GPU runtimes do: its steps are
    # then "unavailable" with the message, not kernel failures.
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '========= Error: Device not supported'\nexit 255\n")
    fake.chmod(0o755)
    env["PATH"] = os.pathsep.join(
        [str(fake.parent)]
        + [p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "compute-sanitizer").exists()]
    )
    began = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.monotonic() - began
    assert result.returncode == 0, result.stderr[-2000:]
    (summary_path,) = out.glob("*_no-gpu_01234567_device_check.json")
    summary = json.loads(summary_path.read_text())
    assert summary["commit"] == "0123456789abcdef"
    steps = summary["steps"]
    # Ordered by the value of what they prove; every step recorded.
    assert list(steps) == [
        "info",
        "warm",
        "parity",
        "captured_step",
        "tensor_cores",
        "nccl",
        "gpu_tests",
        "bench",
        "memcheck",
        "racecheck",
        "gemm_sweep",
    ]
    assert steps["info"]["passed"]
    for tool in ("memcheck", "racecheck"):
        assert steps[tool]["status"] == "unavailable", steps[tool]
        assert "Device not supported" in steps[tool]["last_lines"][-1]
    # Without a GPU: the GPU tests fail (cupy required, a skip is a failure), the sweep and the
    # bench measure nothing and say so with a non-zero exit; none of them hangs.
    for name in ("warm", "parity", "gpu_tests", "gemm_sweep", "bench"):
        assert steps[name]["status"] == "failed", (name, steps[name])
    # The newer paths' steps run their gpu tests where there are some, and say so where not.
    for name in ("captured_step", "tensor_cores", "nccl"):
        assert steps[name]["status"] in ("failed", "no_tests"), (name, steps[name])
    assert steps["nccl"]["status"] == "failed", steps["nccl"]  # its one-rank all-reduce test
    assert steps["parity"]["failing_tests"], steps["parity"]
    assert all("cupy" in line for line in steps["parity"]["failing_tests"][:3])
    # The summary printed names the steps and the failing tests in a few lines.
    assert re.search(r"^ +parity +failed", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"(FAILED|ERROR) tests/test_parity.py::", result.stdout), result.stdout
    bench = json.loads((out / summary["benchmark_record"]).read_text())
    assert bench["complete"] and bench["results"] == []
    assert json.loads((out / "gemm_sweep.json").read_text())["best"] is None
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {Path(n).name for n in logs.getnames()}
    assert {"steps.txt", "parity.log", "gpu_tests.log", "bench.log", "nvidia-smi.log"} <= names
    # On the CPU (no GPU step can run) the check ends well inside its 270-second budget.
    assert elapsed < 200, elapsed
