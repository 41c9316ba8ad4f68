"""dsv4-multihost from a source checkout: `python scripts/serve_multihost.py --help`.

A thin front end over `sharding.serve.main` (installed as the console script `dsv4-multihost`);
the launch recipes for a TPU slice, one multi-GPU host and several GPU hosts are in
`sharding/serve.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
