"""`python -m trunkline ...` is the `trunkline` command."""

import sys

from trunkline.cli import main

sys.exit(main())
