"""``python -m adpm_dist.train``: see :mod:`adpm_dist.train.loop`."""

import sys

from adpm_dist.train.loop import main

sys.exit(main())
