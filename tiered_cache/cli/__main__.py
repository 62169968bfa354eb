"""`python -m tiered_cache.cli`, the same as the console script."""

import sys

from . import main

sys.exit(main())
