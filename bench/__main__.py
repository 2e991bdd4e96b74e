"""`python -m bench <recipe> ...`: see bench/harness.py (and `python -m bench --help`)."""

from bench.harness import main

raise SystemExit(main())
