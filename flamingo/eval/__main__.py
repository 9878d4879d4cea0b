"""`python -m flamingo.eval`, the same as `flamingo-eval` (and what `accelerate launch -m` runs)."""

import sys

from .cli import main

sys.exit(main())
