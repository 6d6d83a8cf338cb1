"""`python -m pytest_gradcheck TARGET`: the same command line as the `gradcheck` script."""

from pytest_gradcheck.cli import main

raise SystemExit(main())
