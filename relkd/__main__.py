"""``python -m relkd`` is the ``relkd`` command."""

import sys

from relkd.cli import main

sys.exit(main())
