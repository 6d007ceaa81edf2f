"""`python -m forge` runs the CLI."""

from forge.cli import main

raise SystemExit(main())
