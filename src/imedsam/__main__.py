"""``python -m imedsam``: the ``imedsam`` command (what ``torchrun ... -m imedsam train`` runs in each process)."""

import sys

from imedsam.cli import main

if __name__ == "__main__":
    sys.exit(main())
