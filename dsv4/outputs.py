"""Writing outputs safely: never a half-written file or directory where a user looks for a finished one.

Every file goes to a temporary name beside its target and is renamed onto it when complete; a
directory is built under a temporary name and swapped in by `replace_dir`. Temporary files are
created with the usual permissions (0o666 less the umask, as a plain `open(path, "w")`), not
mkstemp's 0o600, so a shared checkpoint stays readable by whoever could read the old one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_file(path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it onto `path`.

    On any failure the temporary file is removed and `path` is left as it was. The new file is on the
    disk before the rename (a power cut leaves the old file or the new one, never an empty one) and
    keeps the permissions of the file it replaces.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically."""
    write_file(path, lambda f: f.write(text))


def write_json(path, doc, indent: int | None = 1) -> None:
    """`doc` as JSON plus a newline, atomically."""
    write_text(path, json.dumps(doc, indent=indent) + "\n")


def some_names(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, comma-separated, then how many more there are (for one-line errors)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def holds_cwd(path) -> bool:
    """Whether the current directory is `path` or lies inside it: renaming `path` away would pull the
    directory out from under the process (its later relative paths would fail)."""
    try:
        cwd, target = Path.cwd().resolve(), Path(path).resolve()
    except OSError:  # the current directory is already gone
        return False
    return cwd == target or target in cwd.parents


def replace_dir(fresh, dst) -> None:
    """Rename the finished directory `fresh` onto `dst`.

    An existing `dst` is first renamed to a new hidden sibling, put back if the second rename
    fails, and deleted only once `fresh` is in place. Both paths must be on one file system.
    An empty `dst` holding the current directory (`--out .`) is filled in place instead, entry by
    entry; a non-empty one is refused (the callers refuse it before any work: `holds_cwd`).
    """
    fresh, dst = Path(os.path.abspath(fresh)), Path(os.path.abspath(dst))
    if not dst.exists():
        os.replace(fresh, dst)
        return
    if holds_cwd(dst):
        if any(dst.iterdir()):
            raise FileExistsError(f"{dst}: holds the current directory, so it cannot be replaced")
        for entry in sorted(fresh.iterdir()):
            os.replace(entry, dst / entry.name)
        fresh.rmdir()
        return
    attic = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
    old = attic / "old"
    try:
        os.replace(dst, old)
    except BaseException:  # dst cannot move (a mount point, a busy directory): leave no attic behind
        attic.rmdir()
        raise
    try:
        os.replace(fresh, dst)
    except BaseException:
        os.replace(old, dst)
        attic.rmdir()
        raise
    shutil.rmtree(attic)


def check_creatable(path, flag: str, parents: bool = True) -> None:
    """ValueError naming `flag` unless `path` can be created (or replaced) by the writers here.

    Tried, not guessed (a root process passes every permission test, yet /proc refuses it): a
    scratch file is created and removed in the directory the output goes into, or with `parents`
    (the caller creates missing parents) in its nearest existing ancestor.
    """
    path = Path(path)
    where = path.absolute().parent
    while parents and not where.exists() and where != where.parent:
        where = where.parent
    if where.exists() and not where.is_dir():
        raise ValueError(f"{flag} {path}: {where} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in {where}: {err.strerror or err}") from None


def paths_overlap(a, b) -> bool:
    """Whether `a` and `b` are the same directory or one lies inside the other (after resolving)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents
