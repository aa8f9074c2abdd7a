"""`python -m llmsys.testing.reference train|eval|info` (see llmsys.testing.reference.cli)."""

import sys

from llmsys.testing.reference.cli import main

if __name__ == "__main__":  # spawned data workers import this module as __mp_main__: no re-run
    sys.exit(main())
