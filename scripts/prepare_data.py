#!/usr/bin/env python
"""Convert instruction data (an OFA-style TSV, or a folder of images + a JSONL) to MIMIC-IT files, validate them and
print statistics; also rebuilds the bundled toy dataset (`python scripts/prepare_data.py toy otter/assets/toy`).

Same as the `otter-prepare-data` command and `otter.prepare_data.main`; see `--help`.
"""

from otter.prepare_data import main

if __name__ == "__main__":
    main()
