"""`python -m lapp_edge ...` (and `torchrun ... -m lapp_edge train ...`) runs the CLI."""

import sys

from lapp_edge.cli import main

sys.exit(main())
