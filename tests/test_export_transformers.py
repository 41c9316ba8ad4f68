"""An exported release-layout directory reads through transformers' own FP8 loader as through load_hf.

transformers (DeepseekV4ForCausalLM) loads the release layout pre-quantized: `from_pretrained(dir,
quantization_config=FineGrainedFP8Config(dequantize=True))` keeps the checkpoint's quantization
settings (scale_fmt "ue8m0", expert_dtype "fp4") and dequantizes while loading with
`integrations.finegrained_fp8.Fp8Dequantize`: FP8 projections with their F8_E8M0 128x128 block scales
(renamed `.scale` -> `.weight_scale_inv`) and the packed FP4 experts (two E2M1 nibbles per I8 byte,
an E8M0 scale per row and 32 inputs) before the per-expert weights are stacked.

What it does not do, measured with the installed version:
  * block sizes come from `dim // scale_grid`, not `weight_block_size`: a partial tile (a dimension
    that is not a multiple of 128 for FP8, of 32 for FP4 groups) is dequantized with the wrong block
    boundaries (`test_transformers_dequant_needs_whole_tiles`). The released Flash/Pro dimensions are
    all multiples of 128, and TINY_FLASH (hidden 64, expert width 32) has whole tiles, so it is the
    config used here; TINY_PRO (hidden 160, expert width 48) loads with wrong FP4 expert values.
  * with `dtype=torch.float32` the tensors stored in BF16 (embeddings, norms, router, head) stay
    bfloat16 and the forward fails on mixed dtypes; `.float()` after loading fixes that, and it is
    exact (every BF16 value is a float32 value).
  * the quantizer refuses to start without `accelerate` installed although `dequantize=True` uses
    none of it (validate_environment returns right after that gate); without it the gate is patched.

Tolerance: both sides run float32 on bit-identical weights (checked tensor by tensor first), so the
logits differ only by the order of float32 operations (matmul accumulation, softmax, Sinkhorn):
relative Frobenius error <= 1e-4, as in test_parity (measured: about 1e-7 relative; max abs 2e-7
on logits of magnitude ~1). The negative control changes one E8M0 scale byte in the exported files
(one 128x128 block of one projection doubled) and must move the logits beyond that tolerance.
"""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from flax import nnx

import dsv4
from dsv4 import checkpoint, export
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.safetensors_io import CheckpointIndex

TOL = 1e-4
SEQ = 300  # two HCA windows (128), many sliding windows (32), 75 CSA entries with index_topk 16
PERTURBED_SCALE = "layers.1.attn.wo_b.scale"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def fp8_loader(monkeypatch):
    """FineGrainedFP8Config(dequantize=True); lifts the quantizer's `accelerate` gate when it is missing."""
    from transformers import FineGrainedFP8Config

    if importlib.util.find_spec("accelerate") is None:
        import transformers.quantizers.quantizer_finegrained_fp8 as qf

        monkeypatch.setattr(qf, "is_accelerate_available", lambda: True)
    return lambda: FineGrainedFP8Config(dequantize=True)


def load_transformers(path, quantization_config):
    """DeepseekV4ForCausalLM from a release-layout directory, dequantized, float32 throughout."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(path, quantization_config=quantization_config, dtype=torch.float32)
    return model.float().eval()  # BF16-stored tensors arrive as bfloat16 (see module docstring)


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens), use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(directory, float32 load_hf logits, tokens) of a random TINY_FLASH model exported by export_release."""
    from release_fixture import TINY_FLASH

    cfg = ModelConfig.from_hf_config(TINY_FLASH)
    model = dsv4.init_model(cfg, RuntimeConfig(dtype="float32", query_block=32), seed=5)
    out = export.export_release(model, None, tmp_path_factory.mktemp("hf_export") / "ckpt", max_shard_bytes=256 * 1024)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ))
    ours = np.asarray(dsv4.forward(dsv4.load_hf(out, dtype="float32", query_block=32), tokens))
    return out, ours, tokens


def test_transformers_reads_every_tensor_exactly(exported, fp8_loader):
    from release_fixture import release_tensors_from_hf

    path, _, _ = exported
    hf = load_transformers(path, fp8_loader())
    theirs = release_tensors_from_hf(hf.state_dict())
    cfg = ModelConfig.from_hf_config(path)
    index = CheckpointIndex(path)
    specs = checkpoint.release_specs(nnx.split(dsv4.abstract_model(cfg))[1])
    compared = set()
    for t in (t for spec in specs for t in spec.tensors if not t.name.startswith("mtp.")):
        want = checkpoint.read_dequantized(index, t, (128, 128))
        np.testing.assert_array_equal(theirs[t.name], want, err_msg=t.name)
        compared.add(index.info(t.name).dtype)
    assert {"F8_E4M3", "I8", "BF16", "F32", "I64"} <= compared  # FP8, FP4 experts and the rest


def test_transformers_logits_equal_load_hf(exported, fp8_loader):
    path, ours, tokens = exported
    theirs = hf_logits(load_transformers(path, fp8_loader()), tokens)
    err = rel_err(ours, theirs)
    print(f"load_hf vs transformers on the exported dir: rel {err:.2e}, max abs {np.abs(ours - theirs).max():.2e}")
    assert err <= TOL


def _perturb_scale(src, dst, name: str) -> None:
    """Copy checkpoint `src` to `dst` with the first E8M0 byte of scale `name` one higher (block x 2)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shard = dst / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    raw = tensors[name].view(torch.uint8).clone()
    raw.view(-1)[0] += 1
    tensors[name] = raw.view(tensors[name].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_negative_control_one_changed_scale_is_seen(exported, fp8_loader, tmp_path):
    path, ours, tokens = exported
    _perturb_scale(path, tmp_path / "perturbed", PERTURBED_SCALE)
    theirs = hf_logits(load_transformers(tmp_path / "perturbed", fp8_loader()), tokens)
    err = rel_err(ours, theirs)
    print(f"one scale byte of {PERTURBED_SCALE} + 1: rel {err:.2e}")
    assert err > 10 * TOL


def _transformers_dequant(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' Fp8Dequantize on one (FP8 or packed-FP4, E8M0 scales) pair, float32."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    if weight.dtype == np.int8:  # packed FP4
        w = torch.from_numpy(np.ascontiguousarray(weight))
    else:  # float8_e4m3fn: torch takes the bytes
        w = torch.from_numpy(np.ascontiguousarray(weight).view(np.uint8)).view(torch.float8_e4m3fn)
    s = torch.from_numpy(np.ascontiguousarray(scales).view(np.uint8)).view(torch.float8_e8m0fnu)
    return Fp8Dequantize(None)._dequantize_one(w, s, torch.float32).numpy()


def test_transformers_dequant_needs_whole_tiles():
    """Fp8Dequantize takes block = dim // scale grid: right for whole tiles, wrong for partial ones."""
    from dsv4 import quant

    rng = np.random.default_rng(0)
    for rows, cols in ((256, 256), (48, 160)):  # FP8: whole 128x128 tiles, then a partial column tile
        w = rng.normal(size=(rows, cols)).astype(np.float32)
        w[:, 128:] *= 16  # another scale in the second column tile
        q, s = quant.quantize_fp8(w)
        same = np.array_equal(_transformers_dequant(q, s), quant.dequantize_fp8(q, s))
        assert same == (cols % 128 == 0), (rows, cols)
    for inner in (64, 48):  # FP4: whole 32-input groups, then a partial group
        w = rng.normal(size=(16, inner)).astype(np.float32)
        w[:, 32:] *= 16
        packed, s = quant.quantize_fp4(w)
        same = np.array_equal(_transformers_dequant(packed, s), quant.dequantize_fp4(packed, s))
        assert same == (inner % 32 == 0), inner
