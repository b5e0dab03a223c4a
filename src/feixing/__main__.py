"""`python -m feixing` = the `feixing` command."""

import sys

from feixing.cli import main

sys.exit(main())
