"""Shared pytest fixtures: tiny release-layout checkpoints with their PyTorch oracle models."""

import sys
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # make `dsv4` importable without installing the package
    sys.path.insert(0, str(_REPO_ROOT))


def _build_checkpoint(tmp_path_factory, name: str, cfg: dict, seed: int):
    import torch
    from release_fixture import write_release_checkpoint

    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp(name)
    model = write_release_checkpoint(cfg, path, seed=seed)
    return path, model, cfg


@pytest.fixture(scope="session")
def flash_ckpt(tmp_path_factory):
    """(checkpoint dir, float32 HF oracle model, release config dict) for TINY_FLASH, seed 0."""
    from release_fixture import TINY_FLASH

    return _build_checkpoint(tmp_path_factory, "tiny_flash", TINY_FLASH, seed=0)


@pytest.fixture(scope="session")
def pro_ckpt(tmp_path_factory):
    """(checkpoint dir, float32 HF oracle model, release config dict) for TINY_PRO, seed 1."""
    from release_fixture import TINY_PRO

    return _build_checkpoint(tmp_path_factory, "tiny_pro", TINY_PRO, seed=1)
