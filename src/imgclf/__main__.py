"""``python -m imgclf``: the command line."""

from imgclf.cli import main

raise SystemExit(main())
