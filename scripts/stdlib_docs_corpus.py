"""Write a fine-tuning corpus: the docstrings of 75 Python standard-library modules, one after another.

    python scripts/stdlib_docs_corpus.py corpus.txt          # ~0.4 MB of English prose about Python's library

A domain next to, not inside, the embedded default's training text (pydoc's language-reference
topics): README "Fine-tuning" uses it with `dsv4-train --init embedded`. The text ships with every
CPython (PSF license); which modules exist, and so the bytes, depend on the Python version.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import warnings
from pathlib import Path

MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib email enum fnmatch fractions functools gettext glob gzip hashlib heapq hmac html http "
    "inspect io ipaddress itertools json logging math mimetypes numbers operator os pathlib pickle pprint "
    "queue random re secrets selectors shelve shlex shutil signal socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types typing unittest "
    "urllib uuid warnings weakref zipfile zlib"
).split()


def module_text(name: str) -> str:
    """The module's docstring and those of its public classes, functions and methods, in source order."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr, value in vars(module).items():
        if attr.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            parts.append(inspect.getdoc(value) or "")
        if inspect.isclass(value):
            methods = [m for a, m in vars(value).items() if inspect.isfunction(m) and not a.startswith("_")]
            parts += [inspect.getdoc(m) or "" for m in methods]
    return "\n\n".join(p.strip() for p in parts if p.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="text file to write")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = [module_text(name) for name in MODULES]
    args.out.write_text("\n\n\n".join(d for d in docs if d) + "\n")
    print(f"{args.out}: {len(docs)} modules, {args.out.stat().st_size:,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
