"""`python -m multitoken` (and `torchrun -m multitoken`) runs the CLI."""

import sys

from multitoken.cli import main

sys.exit(main())
