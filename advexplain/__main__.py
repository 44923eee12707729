"""`python -m advexplain ...` runs the `advexplain` command."""

import sys

from advexplain.cli import main

sys.exit(main())
