"""Generate text with a DeepSeek-V4 checkpoint: the `dsv4-generate` console script.

    python scripts/generate.py --prompt "Hello"              # the embedded default (a small trained model)
    python scripts/generate.py --checkpoint DIR --chat --prompt "What is 2 + 2?" --temperature 1.0

See `dsv4/cli.py` (and `--help`) for the options.
"""

import sys

from dsv4.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
