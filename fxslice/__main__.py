"""``python -m fxslice`` (and ``torchrun --nproc-per-node N -m fxslice compress ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
