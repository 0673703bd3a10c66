"""``python -m engram_export.cli``: the command line, as the ``engram-export`` script runs it."""

import sys

from engram_export.cli import main

sys.exit(main())
