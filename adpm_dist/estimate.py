"""Entry point ``python -m adpm_dist.estimate`` (``torchrun -m adpm_dist.estimate``): the stage is
:mod:`adpm_dist.stages.estimate`."""

import sys

from adpm_dist.stages.estimate import main

if __name__ == "__main__":
    sys.exit(main())
