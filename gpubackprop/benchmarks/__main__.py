"""``python -m gpubackprop.benchmarks``: the same as ``gpubackprop bench``."""

import sys

from .cli import main

sys.exit(main())
