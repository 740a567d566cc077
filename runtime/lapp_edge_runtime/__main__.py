"""`python -m lapp_edge_runtime BUNDLE ...`: the same as `lapp-edge-run`."""

import sys

from lapp_edge_runtime.cli import main

sys.exit(main())
