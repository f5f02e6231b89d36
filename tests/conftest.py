"""Settings for the whole suite.

Every emulator launch in the tests runs twice, the second time with other guard bytes, so that
a kernel reading out of bounds and using the value fails whichever test launched it
(GPUBACKPROP_EMU_GUARD_CHECK, gpubackprop/emulator/launch.py).  A test of the plain mode unsets
it with monkeypatch.
"""

import os

import pytest

from gpubackprop.backends.gemm_config import GEMM_VERSIONS

os.environ.setdefault("GPUBACKPROP_EMU_GUARD_CHECK", "1")


@pytest.fixture(scope="module")
def emu_backends():
    """One emulator backend per GEMM version, the library's default first."""
    from gpubackprop.backends.emu_backend import EmuBackend

    backends = [EmuBackend()] + [EmuBackend(gemm_version=v) for v in GEMM_VERSIONS if v != "tiled"]
    if not backends[0].available:
        pytest.skip(f"emulator unavailable: {backends[0].reason}")
    return backends


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With GPUBACKPROP_REQUIRE_GPU set (bench/device_check.sh on a GPU machine), a gpu-marked
    test that skipped, for whatever reason, is a failure: the check must not pass by skipping."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("GPUBACKPROP_REQUIRE_GPU")
        and item.get_closest_marker("gpu") is not None
    ):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"GPUBACKPROP_REQUIRE_GPU is set but this gpu test skipped: {reason}"


def pytest_addoption(parser):
    parser.addoption(
        "--long",
        action="store_true",
        help="also run the long cases (marker 'long', minutes each: e.g. whole 15-epoch jobs on "
        "the emulator); a full run uses it, CI leaves them out",
    )


def pytest_collection_modifyitems(config, items):
    """Deselect 'long' cases unless --long is given (or -m names them), and say so."""
    if config.getoption("--long") or "long" in (config.getoption("-m") or ""):
        return
    long_items = [item for item in items if item.get_closest_marker("long") is not None]
    if long_items:
        items[:] = [item for item in items if item.get_closest_marker("long") is None]
        config.hook.pytest_deselected(items=long_items)
