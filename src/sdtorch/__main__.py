"""`python -m sdtorch`: the `sdtorch` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
