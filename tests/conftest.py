"""Settings for the whole suite.

Every emulator launch in the tests runs twice, the second time with other guard bytes, so that
a kernel reading out of bounds and using the value fails whichever test launched it
(GPUBACKPROP_EMU_GUARD_CHECK, gpubackprop/emulator/launch.py).  A test of the plain mode unsets
it with monkeypatch.
"""

import os

import pytest

os.environ.setdefault("GPUBACKPROP_EMU_GUARD_CHECK", "1")


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
