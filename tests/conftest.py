"""Settings for the whole suite.

Every emulator launch in the tests runs twice, the second time with other guard bytes, so that
a kernel reading out of bounds and using the value fails whichever test launched it
(GPUBACKPROP_EMU_GUARD_CHECK, gpubackprop/emulator/launch.py).  A test of the plain mode unsets
it with monkeypatch.
"""

import os

os.environ.setdefault("GPUBACKPROP_EMU_GUARD_CHECK", "1")
