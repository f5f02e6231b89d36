"""bench/device_check.sh, run on this machine: the plumbing a GPU session depends on.

A GPU session has minutes of device time for one call of the script, so the script itself must
not be what fails.  Without a GPU every GPU step fails quickly; what is checked here is that each
step is run and recorded with its exit code and time, and that summary.json, bench.json,
gemm_sweep.json and logs.tar.gz come back.  (Where a GPU is present the script is the real
check, run on its own; this test would take its full eight minutes, so it leaves it to that.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
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
    # No compute-sanitizer here, whatever the machine has: its steps are then recorded as 127.
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "compute-sanitizer").exists()
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["commit"] == "0123456789abcdef"
    steps = summary["steps"]
    assert set(steps) >= {"info", "parity", "memcheck", "gemm_sweep", "bench"}
    assert steps["info"]["passed"]
    # Without a GPU: the parity suite fails (cupy required), the sweep and the bench measure
    # nothing and say so with a non-zero exit; none of them hangs.
    for name in ("parity", "gemm_sweep", "bench"):
        assert steps[name]["exit_code"] not in (0, 124, 137), (name, steps[name])
    assert any("cupy" in line for line in summary["parity_tail"])
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and bench["results"] == []
    assert json.loads((out / "gemm_sweep.json").read_text())["best"] is None
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {Path(n).name for n in logs.getnames()}
    assert {"steps.txt", "parity.log", "bench.log", "nvidia-smi.log"} <= names
