"""``python -m gpubackprop`` runs the command line."""

import sys

from gpubackprop.cli import main

sys.exit(main())
