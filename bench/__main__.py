"""`python -m tiered_cache.bench`: the same as `tiered-cache bench`."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
