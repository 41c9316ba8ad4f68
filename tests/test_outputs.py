"""dsv4.outputs: atomic file writes, the directory swap, and the overlap check; the train log's reading."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dsv4 import outputs


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_text_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        outputs.write_file(target, fail)
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.json"]  # no temporary file left
    outputs.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert _listing(tmp_path) == ["out.json"]


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        outputs.write_text(tmp_path / "config.json", "{}")
        outputs.write_file(tmp_path / "w.bin", lambda f: f.write(b"\0"), binary=True)
    finally:
        os.umask(old)
    for name in ("config.json", "w.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_replaced_file_keeps_its_permissions_and_reaches_the_disk(tmp_path, monkeypatch):
    """A private (0o600) file became 0o644 when rewritten; nothing was fsynced before the rename."""
    path = tmp_path / "secret.json"
    path.write_text("{}")
    path.chmod(0o600)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    outputs.write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == '{\n "a": 1\n}\n'
    assert len(synced) == 1


def _tree(directory, files):
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_replace_dir_swaps_in_a_new_directory(tmp_path):
    dst = _tree(tmp_path / "ckpt", {"config.json": "old", "stale.bin": "x"})
    fresh = _tree(tmp_path / "fresh", {"config.json": "new"})
    outputs.replace_dir(fresh, dst)
    assert _listing(dst) == ["config.json"] and (dst / "config.json").read_text() == "new"
    assert _listing(tmp_path) == ["ckpt"]  # the old copy is gone
    outputs.replace_dir(_tree(tmp_path / "again", {"a": "1"}), tmp_path / "absent")
    assert (tmp_path / "absent" / "a").read_text() == "1"


def test_replace_dir_is_not_blocked_by_an_interrupted_earlier_swap(tmp_path):
    """A swap killed while deleting the old copy leaves it beside DST; the next swap picks a new name."""
    dst = _tree(tmp_path / "ckpt", {"config.json": "v2"})
    _tree(tmp_path / "ckpt.old-dsv4-convert", {"left": "over"})  # the fixed name dsv4-convert used
    _tree(tmp_path / ".ckpt.old.abc", {"left": "over"})
    outputs.replace_dir(_tree(tmp_path / "fresh", {"config.json": "v3"}), dst)
    assert (dst / "config.json").read_text() == "v3"


def test_replace_dir_puts_the_old_directory_back_when_the_swap_fails(tmp_path, monkeypatch):
    dst = _tree(tmp_path / "ckpt", {"config.json": "old"})
    fresh = _tree(tmp_path / "fresh", {"config.json": "new"})
    real_replace, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the rename of `fresh` onto DST
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        outputs.replace_dir(fresh, dst)
    monkeypatch.undo()
    assert (dst / "config.json").read_text() == "old"
    assert (fresh / "config.json").read_text() == "new"
    assert _listing(tmp_path) == ["ckpt", "fresh"]


def test_replace_dir_leaves_nothing_behind_when_dst_cannot_move(tmp_path, monkeypatch):
    """DST that refuses to move (a mount point: EBUSY) leaves neither an attic nor a changed DST."""
    dst = _tree(tmp_path / "ckpt", {"config.json": "old"})
    fresh = _tree(tmp_path / "fresh", {"config.json": "new"})

    def busy(a, b):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OSError, match="busy"):
        outputs.replace_dir(fresh, dst)
    monkeypatch.undo()
    assert _listing(tmp_path) == ["ckpt", "fresh"] and (dst / "config.json").read_text() == "old"


def test_paths_overlap(tmp_path):
    a = tmp_path / "a"
    assert outputs.paths_overlap(a, a) and outputs.paths_overlap(a, a / "b") and outputs.paths_overlap(a / "b", a)
    assert not outputs.paths_overlap(a, tmp_path / "ab")
    assert outputs.paths_overlap(tmp_path / "x" / ".." / "a", a)


# --------------------------------------------------------------------------- dsv4-train's files


def test_metrics_log_resumes_past_a_torn_last_line(tmp_path):
    from dsv4.cli import CLIError
    from dsv4.cli_train import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lm_loss": 5.0}\n{"step": 2, "lm_loss": 4.0}\n{"step": 3, "lm_lo')
    log = MetricsLog(path, resume_step=2)
    assert [r["step"] for r in log.records] == [1, 2]
    log.add({"step": 3, "lm_loss": 3.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]

    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CLIError, match=r"metrics\.jsonl:2: not a metrics record"):
        MetricsLog(path, resume_step=2)
    path.write_text('{"loss": 1}\n')
    with pytest.raises(CLIError, match=r"metrics\.jsonl:1: .*no integer step"):
        MetricsLog(path, resume_step=2)
