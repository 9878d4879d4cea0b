#!/usr/bin/env python
"""Convert an OpenFlamingo checkpoint.pt or an Otter final_weights.pt into a Hugging Face folder.

Same as the `flamingo-convert` command and `flamingo.convert.convert`; see `--help` and docs/converting.md.
"""

from flamingo.commands.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
