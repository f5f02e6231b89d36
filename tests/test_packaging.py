"""What pyproject.toml promises an installer: the GPU extras bring the CUDA toolkit CuPy needs at
run time, and the dev extra stays small enough for a CPU-only CI machine."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _extras() -> dict[str, list[str]]:
    with PYPROJECT.open("rb") as handle:
        return tomllib.load(handle)["project"]["optional-dependencies"]


@pytest.mark.parametrize("extra, package", [("cuda12", "cupy-cuda12x"), ("cuda13", "cupy-cuda13x")])
def test_gpu_extras_install_cupy_with_its_cuda_toolkit(extra, package):
    cupy = [r for r in _extras()[extra] if r.startswith(package)]
    assert cupy == [f"{package}[ctk]>=14.2"], cupy  # 14.2 is the first release checked to have ctk


def test_dev_extra_compiles_kernels_without_pulling_the_toolkit():
    dev = _extras()["dev"]
    assert not [r for r in dev if "[ctk]" in r or r.startswith("cuda-toolkit")]
    assert any(r.startswith("nvidia-cuda-nvrtc") for r in dev)
