"""``python -m freespec``: the same command line as the ``freespec`` script."""
from freespec.cli import main

raise SystemExit(main())
