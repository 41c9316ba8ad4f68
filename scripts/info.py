"""Parameter counts and KV cache size of a DeepSeek-V4 config: the `dsv4-info` console script.

    python scripts/info.py --config flash --context 1048576
    python scripts/info.py --config pro --context 131072 --cache-format compact
    python scripts/info.py --config path/to/config.json --context 8192

See `dsv4/cli.py` (and `--help`) for the options.
"""

import sys

from dsv4.cli import info_main

if __name__ == "__main__":
    sys.exit(info_main())
