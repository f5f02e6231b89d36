#!/usr/bin/env python3
"""Run the benchmark harness from a source checkout without installing the package:

    python bench/run_bench.py --quick --json bench/latest.json

Same options as ``gpubackprop bench`` (see bench/README.md); the harness itself is
the package gpubackprop/benchmarks/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpubackprop.benchmarks import main  # after the path is set

if __name__ == "__main__":
    sys.exit(main())
