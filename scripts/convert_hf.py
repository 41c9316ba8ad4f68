"""Thin front end of `dsv4-convert` for a source checkout: python scripts/convert_hf.py SRC DST [...]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.cli_convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
