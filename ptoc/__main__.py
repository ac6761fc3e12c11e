"""``python -m ptoc``: the same command line as the ``ptoc`` script (:mod:`ptoc.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
