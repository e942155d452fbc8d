"""ftctl entry point."""

import sys

from ftctl.cli import main

sys.exit(main())
