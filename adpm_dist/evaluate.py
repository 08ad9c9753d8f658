"""Entry point ``python -m adpm_dist.evaluate`` (``torchrun -m adpm_dist.evaluate``): the stage is
:mod:`adpm_dist.stages.evaluate`."""

import sys

from adpm_dist.stages.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
