"""`python -m sharding.plan …` runs `python -m planner …` (same flags, same output)."""

import sys

from planner.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
