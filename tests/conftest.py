"""Shared pytest fixtures: tiny release-layout checkpoints with their PyTorch oracle models."""

import os
import sys
from pathlib import Path

import pytest

# The console scripts keep a persistent compilation cache (dsv4.xla_flags.enable_compile_cache);
# tests that call them in this process (and their subprocesses) must not write one into $HOME.
os.environ["DSV4_COMPILE_CACHE"] = "off"

# The tests compile hundreds of small programs and run each a few times: XLA:CPU's backend
# optimisation level 0 (LLVM's, after every HLO pass) cuts the suite's CPU time by about a third
# (tests/test_train.py and tests/test_model.py: 413 -> 259 s of CPU time). A caller's own setting
# wins; subprocesses inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

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


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compilation caches after each test module.

    Every XLA:CPU executable keeps its JIT-compiled code in memory mappings of its own; the whole
    suite in one process compiles thousands of programs, and kept alive they reached the kernel's
    limit of 65,530 mappings per process (vm.max_map_count): LLVM then failed with "Cannot
    allocate memory" and aborted the run, at 8 GB of resident memory.
    """
    yield
    import jax

    jax.clear_caches()


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


@pytest.fixture
def verify_triton_modules(monkeypatch):
    """Run MLIR's verifier on every Triton module the Pallas GPU lowering builds, on a CPU host.

    Lowering for CUDA on a CPU host stops at a serialized Triton module; the GPU parses (and
    verifies) it only when compiling. Verifying here catches ill-typed modules early: a decode
    kernel whose loop bounds had two integer types passed the lowering test and failed on an H200
    with "'scf.for' op failed to verify that all of {lowerBound, upperBound, step} have same type".
    Returns the list the names of the verified kernels are appended to.
    """
    from jax._src.pallas.triton import lowering

    original = lowering.lower_jaxpr_to_triton_module
    verified = []

    def lower_and_verify(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        result.module.operation.verify()  # raises MLIRError with the verifier's diagnostics
        verified.append(jaxpr.debug_info.func_name)
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified


MAX_TEST_WORKERS = 4  # each worker holds JAX, torch and transformers (a few GB with the 8-device subprocesses)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most MAX_TEST_WORKERS.

    Most of the suite's time is XLA compilation, one core per program, so two workers on two cores
    run it in about two thirds of the one-process time. `--dist loadfile` keeps each file in one
    worker: its module fixtures (the sharding matrix, the training runs) are computed once.
    """
    return max(1, min(os.cpu_count() or 1, MAX_TEST_WORKERS))
