"""``python -m glance_lightning``: see :mod:`glance_lightning.cli`."""

import sys

from glance_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
