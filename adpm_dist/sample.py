"""Entry point ``python -m adpm_dist.sample`` (``torchrun -m adpm_dist.sample``): the stage is
:mod:`adpm_dist.stages.sample`."""

import sys

from adpm_dist.stages.sample import main

if __name__ == "__main__":
    sys.exit(main())
