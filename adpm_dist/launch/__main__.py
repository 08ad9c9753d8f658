"""``python -m adpm_dist.launch``: see :mod:`adpm_dist.launch.cli`."""

import sys

from adpm_dist.launch.cli import main

sys.exit(main())
