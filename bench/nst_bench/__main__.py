"""``python -m nst_bench``: the same as ``nst-benchmark``."""

import sys

from nst_bench.cli import main

sys.exit(main())
