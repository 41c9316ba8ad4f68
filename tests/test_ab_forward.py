"""scripts/ab_forward.py's two ways of making version B: a module constant set, a definition put back."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from ab_forward import put_back, set_attr  # noqa: E402

from dsv4 import attention


def test_set_attr_and_put_back_from_a_revision(monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.fail("ab_forward reads definitions from git: this checkout has no history")
    committed = attention.KEY_CHUNK
    monkeypatch.setattr(attention, "KEY_CHUNK", committed)  # restored after the test
    set_attr("dsv4.attention:KEY_CHUNK=7")
    assert attention.KEY_CHUNK == 7
    put_back("dsv4.attention:KEY_CHUNK@HEAD")
    assert attention.KEY_CHUNK == committed

    original = attention.key_chunk
    monkeypatch.setattr(attention, "key_chunk", original)
    put_back("dsv4.attention:key_chunk@HEAD")
    assert attention.key_chunk is not original and attention.key_chunk(128, 8) == original(128, 8)


@pytest.mark.parametrize(
    "call, spec, message",
    [
        (set_attr, "dsv4.attention:KEY_CHUNK", "MODULE:NAME=VALUE"),
        (put_back, "dsv4.attention:key_chunk", "MODULE:NAME@REV"),
        (put_back, "dsv4.attention:no_such_name@HEAD", "defines no top-level no_such_name"),
        (put_back, "dsv4.attention:key_chunk@no-such-revision", "git show no-such-revision"),
    ],
)
def test_bad_specs_are_named(call, spec, message):
    with pytest.raises(SystemExit, match=message):
        call(spec)
