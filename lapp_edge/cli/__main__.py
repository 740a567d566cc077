"""`python -m lapp_edge.cli ...` runs the CLI."""

import sys

from lapp_edge.cli import main

sys.exit(main())
