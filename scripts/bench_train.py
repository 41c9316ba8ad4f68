"""Training-step speed: dsv4's jitted train step (JAX) against a transformers + torch.optim.AdamW step.

    python scripts/bench_train.py                         # batch 1 x 1024 tokens, the default rows
    python scripts/bench_train.py --seq 256 --steps 2     # smoke check
    python scripts/bench_train.py --hf-dtypes float32 bfloat16 --breakdown
    python scripts/bench_train.py --one '{"impl": "dsv4", "dtype": "float32", "loss": "lm", ...}'

Both sides train the small config of scripts/_bench_common.py (hidden 256, 4 layers CSA/HCA/CSA/HCA,
8 routed experts top-2 + 1 shared, head_dim 128, index_topk 128, vocab 4096) on this machine
(both on the CPUs, or both on the GPU where torch sees one: `_bench_common.torch_device`), from
the same weights (transformers' model randomised by tests/release_fixture.build_hf_model, copied
into dsv4 through the release names; dsv4's MTP block, which transformers lacks, gets the
fixture's random `mtp.0.*`) and the same batch of random tokens [B, S + 1] (inputs: the first S,
targets: the last S).

- dsv4: `dsv4.train` — `training_model`, `init_train_state`, `make_train_step` (jitted, state
  donated): value_and_grad of the loss, optax clip_by_global_norm(1.0) + adamw(b1 0.9, b2 0.95,
  weight decay 0.1), the router-bias balancing update. Rows: compute_dtype float32 and bfloat16
  (float32 master weights and optimizer state either way) with the LM loss only (mtp_weight 0,
  indexer_weight 0: what the transformers step computes), and the full loss (TrainConfig's
  mtp_weight 0.3 and indexer_weight 1.0: the MTP block's forward/backward and the lightning
  indexer's KL loss and backward on top). Per-layer rematerialisation (`training_model(remat=...)`,
  the library's default for training) is off unless `--remat`: transformers keeps its activations
  too, so both sides do one forward and one backward per step.
- transformers 5.23: `DeepseekV4ForCausalLM` in train mode (eager attention, the only one it has),
  `logits = model(inputs, use_cache=False).logits`, mean cross-entropy against the targets,
  `loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW(lr 3e-4, betas (0.9, 0.95), weight
  decay 0.1)` `.step()`, `zero_grad(set_to_none=True)`. float32; `--hf-dtypes ... bfloat16` adds a
  pure-bfloat16 row (weights, gradients and AdamW state all bfloat16: not the same recipe as
  dsv4's mixed precision, listed only for reference).

Timing: each row runs in a fresh interpreter; `--warmup` steps (the first one compiles dsv4's
step) are excluded, then `--steps` steps are timed back to back (dsv4: `block_until_ready` on each
step's metrics; torch: `float(loss)` each step waits for the device). tokens/s = steps x B x S /
their total wall time.
The first step's LM loss of each row is printed: the float32 rows start from the same weights and
batch, so theirs agree (to about 1e-6).

FLOPs are counted analytically ("model FLOPs": the work of the architecture, not of either
implementation; both sides are divided by the same count), per step of B x S tokens:

    6 * B * S * N_train  +  2 * B * S * N_fwd                      (matmul weights)
  + 3 * B * sum_t sum_layers 4 * H * head_dim * keys(layer, t)     (attention: QK^T and PV)
  + c * B * sum_t sum_CSA 2 * index_n_heads * index_head_dim * floor((t + 1) / 4)   (indexer scores)

N_train: weights used per token by a matmul on the differentiated path (all >= 2-D parameters but
the embedding table, which is a lookup; routed experts scaled by top-k / n_routed_experts; the MTP
block's h_proj x hc_mult, since it maps every residual stream, and the head twice, only with the
MTP loss; MTP weights only with mtp_weight > 0). N_fwd: the lightning indexer's weights when
indexer_weight is 0 (they run forward to select, but get no gradient), else they are in N_train.
keys(layer, t) for the query at position t: min(t + 1, sliding_window) plus the compressed entries
it may see: floor((t + 1) / 128) on HCA layers, min(index_topk, floor((t + 1) / 4)) on CSA ones
(the MTP layer, ratio 0, has the window only). c = 1 with indexer_weight 0, 3 with the indexer loss.
Elementwise work (norms, mHC Sinkhorn, RoPE, softmax, the optimizer) is not counted. transformers'
eager attention actually computes dense [S, S + S/m] scores, and XLA may do masked work too; neither
counts. `--xla-flops` adds, for the dsv4 rows, XLA's own count (`cost_analysis()["flops"]` of the
compiled value_and_grad of the loss: what the compiled program executes, wasted work included).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    SEED,
    backend_text,
    bench_config,
    bench_main,
    config_text,
    dsv4_from_release,
    hf_model_and_release_tensors,
    parse_changes,
    peak_rss_bytes,
    random_tokens,
    run_child,
    torch_device,
)

HF_LR, HF_BETAS, HF_WD, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0  # = TrainConfig's defaults
# Dense bfloat16 tensor-core peak, TFLOP/s, by device-kind substring (vendor datasheets, SXM parts):
# the denominator of model FLOPs utilisation. Other devices: pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(args, results) -> float | None:
    """--peak-tflops, else the datasheet bf16 peak of the device the dsv4 rows ran on (None: unknown, CPU)."""
    if args.peak_tflops:
        return args.peak_tflops
    kinds = {r.get("device_kind", "") for _, r in results if "error" not in r}
    return next((v for kind in kinds for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def train_config(dtype: str, loss: str):
    from dsv4.train import TrainConfig

    if loss == "lm":
        return TrainConfig(mtp_weight=0.0, indexer_weight=0.0, compute_dtype=dtype)
    return TrainConfig(compute_dtype=dtype)  # mtp_weight 0.3, indexer_weight 1.0


# ------------------------------------------------------------------------------------ FLOP count


def model_flops_per_step(batch: int, seq: int, mtp_weight: float, indexer_weight: float, changes=None) -> dict:
    """The analytic count of the module docstring, with its parts."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsv4.model import abstract_model

    cfg = bench_config(changes)
    n_train = n_fwd = 0.0
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
        names = [str(p) for p in path]
        value = var.get_value()
        if value.ndim < 2 or not jnp.issubdtype(value.dtype, jnp.floating) or names[0] == "embed" or "ape" in names:
            continue
        n = float(np.prod(value.shape))
        if "experts" in names and "shared_experts" not in names:
            n *= cfg.num_experts_per_tok / cfg.n_routed_experts
        if names[0] == "mtp":
            if not mtp_weight:
                continue
            if "h_proj" in names:
                n *= cfg.hc_mult
        if names[0] == "head" and mtp_weight:
            n *= 2
        if "indexer" in names and not indexer_weight:
            n_fwd += n
        else:
            n_train += n
    t = np.arange(1, seq + 1, dtype=np.float64)  # t + 1 for positions t = 0 .. S - 1
    window = np.minimum(t, cfg.sliding_window)
    ratios = list(cfg.compress_ratios[: cfg.num_hidden_layers]) + ([cfg.mtp_ratio(0)] if mtp_weight else [])
    attn = idx = 0.0
    for r in ratios:
        keys = window.copy()
        if r == 4:
            keys += np.minimum(cfg.index_topk, t // 4)
            idx += 2 * cfg.index_n_heads * cfg.index_head_dim * float(np.sum(t // 4))
        elif r:
            keys += t // r
        attn += 4 * cfg.num_attention_heads * cfg.head_dim * float(np.sum(keys))
    parts = {
        "matmul": 6 * batch * seq * n_train + 2 * batch * seq * n_fwd,
        "attention": 3 * batch * attn,
        "indexer": (3 if indexer_weight else 1) * batch * idx,
    }
    return {**parts, "total": sum(parts.values()), "n_train": n_train, "n_fwd": n_fwd}


# ----------------------------------------------------------------------------- one measurement


def _time_steps(run_step, warmup: int, steps: int) -> dict:
    """run_step() -> first-step LM loss (float) on the first call; times warmup and timed steps."""
    t0 = time.perf_counter()
    loss0 = run_step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run_step()
    walls, c0, t0 = [], time.process_time(), time.perf_counter()
    for _ in range(steps):
        s0 = time.perf_counter()
        run_step()
        walls.append(time.perf_counter() - s0)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"first_s": first, "total_s": total, "cpu_s": cpu, "step_min_s": min(walls), "step_max_s": max(walls),
            "loss0": loss0}  # fmt: skip


def measure_dsv4(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import dsv4
    from dsv4 import train
    from dsv4.config import RuntimeConfig

    cfg = bench_config(spec.get("changes"))
    hf_model, release = hf_model_and_release_tensors(cfg, SEED)
    del hf_model
    model = dsv4.init_model(cfg, RuntimeConfig(dtype="float32", query_block=spec["query_block"]), SEED)
    dsv4_from_release(model, release)
    del release
    tc = train_config(spec["dtype"], spec["loss"])
    graphdef, state = train.init_train_state(_training_model(model, spec["remat"]), tc)
    del model
    step = train.make_train_step(graphdef, tc)
    tokens = jnp.asarray(random_tokens(cfg.vocab_size, spec["batch"], spec["seq"] + 1))
    batch = {"tokens": tokens}
    extra = {}
    if spec.get("xla_flops") or spec.get("breakdown"):
        extra = _dsv4_extras(graphdef, tc, state, batch, spec)
    box = [state]

    def run_step():
        box[0], metrics = step(box[0], batch)
        return float(jax.block_until_ready(metrics["lm_loss"]))

    out = _time_steps(run_step, spec["warmup"], spec["steps"])
    return {**out, **extra, "backend": backend_text("jax"), "device_kind": jax.devices()[0].device_kind}


def _training_model(model, remat: bool):
    """dsv4.train.training_model with per-layer remat on or off (explicitly: its default is on)."""
    from dsv4 import train

    if "remat" in inspect.signature(train.training_model).parameters:
        return train.training_model(model, remat=remat)
    if remat:
        raise SystemExit("this dsv4.train.training_model has no remat option")
    return train.training_model(model)


def _dsv4_extras(graphdef, tc, state, batch, spec) -> dict:
    """XLA's FLOP count of value_and_grad(loss) and/or the time of the forward loss and of value_and_grad."""
    import jax

    from dsv4 import train

    def loss(p):
        return train.loss_fn(graphdef, tc, p, state.frozen, batch)[0]

    fwd, vg = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    out = {}
    if spec.get("xla_flops"):
        cost = vg.lower(state.params).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["xla_flops"] = float(cost.get("flops", float("nan")))
    if spec.get("breakdown"):
        for name, fn in (("forward", fwd), ("value_and_grad", vg)):
            jax.block_until_ready(fn(state.params))
            t0 = time.perf_counter()
            for _ in range(spec["steps"]):
                jax.block_until_ready(fn(state.params))
            out[f"{name}_s"] = (time.perf_counter() - t0) / spec["steps"]
    return out


def measure_hf(spec: dict) -> dict:
    import torch

    cfg = bench_config(spec.get("changes"))
    model, _ = hf_model_and_release_tensors(cfg, SEED, with_mtp=False)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    device = torch_device()
    model = model.to(device=device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=HF_LR, betas=HF_BETAS, weight_decay=HF_WD)
    tokens = torch.from_numpy(random_tokens(cfg.vocab_size, spec["batch"], spec["seq"] + 1)).long().to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def run_step():
        opt.zero_grad(set_to_none=True)
        logits = model(inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        return float(loss.detach())

    out = _time_steps(run_step, spec["warmup"], spec["steps"])
    return {**out, "backend": f"{backend_text('torch')}, attn {model.config._attn_implementation}"}


def measure_one(spec: dict) -> dict:
    load = os.getloadavg()[0]
    out = measure_dsv4(spec) if spec["impl"] == "dsv4" else measure_hf(spec)
    tokens = spec["batch"] * spec["seq"] * spec["steps"]
    out.update(spec=spec, tokens_per_s=tokens / out["total_s"], peak_rss=peak_rss_bytes(),
               load=max(load, os.getloadavg()[0]))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- the driver


def row_specs(args) -> list[dict]:
    base = {"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
            "query_block": args.query_block, "remat": args.remat, "xla_flops": args.xla_flops,
            "breakdown": args.breakdown, "changes": args.changes}  # fmt: skip
    rows = [{**base, "impl": "dsv4", "dtype": d, "loss": "lm"} for d in args.dsv4_dtypes]
    rows += [{**base, "impl": "dsv4", "dtype": d, "loss": "full"} for d in args.full_loss_dtypes]
    rows += [{**base, "impl": "transformers", "dtype": d, "loss": "lm"} for d in args.hf_dtypes]
    return rows


def _loss_text(spec: dict) -> str:
    if spec["impl"] != "dsv4" or spec["loss"] == "lm":
        return "LM"
    tc = train_config(spec["dtype"], "full")
    return f"LM + {tc.mtp_weight} MTP + {tc.indexer_weight} indexer"


def main_table(args) -> None:
    script = Path(__file__).resolve()
    results = []
    for spec in row_specs(args):
        r = run_child(script, ["--one", json.dumps(spec)], args.timeout)
        print(f"# {json.dumps(r)}", file=sys.stderr, flush=True)
        results.append((spec, r))
    flops = {}
    for loss in ("lm", "full"):
        tc = train_config("float32", loss)
        flops[loss] = model_flops_per_step(args.batch, args.seq, tc.mtp_weight, tc.indexer_weight, args.changes)
    ref = next((r for s, r in results if s["impl"] == "transformers" and s["dtype"] == "float32" and "error" not in r),
               None)  # fmt: skip
    loads = [r["load"] for _, r in results if "load" in r]
    print(f"DeepSeek-V4 training step, batch {args.batch} x seq {args.seq}, {args.steps} timed steps after "
          f"{args.warmup} warm-up step(s) (compilation excluded), dsv4 remat {'on' if args.remat else 'off'}; "
          f"1-min load average during the runs {min(loads, default=0):.1f}-{max(loads, default=0):.1f} on "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"config: ModelConfig.tiny({config_text(args.changes)})")
    print("weights: the same on both sides (transformers' random init copied into dsv4); same batch\n")
    peak = peak_tflops(args, results)
    mfu_head, mfu_rule = (" MFU |", "---:|") if peak else ("", "")
    print(f"| impl | dtype | loss | batch | seq | tokens/s | GFLOP/s | speedup |{mfu_head}")
    print(f"|---|---|---|---:|---:|---:|---:|---:|{mfu_rule}")
    notes = []
    for spec, r in results:
        cells = [spec["impl"], spec["dtype"], _loss_text(spec), str(spec["batch"]), str(spec["seq"])]
        name = f"{spec['impl']} {spec['dtype']} {spec['loss']}"
        if "error" in r:
            cells += [r["error"].split(":")[0], "-", "-"] + (["-"] if peak else [])
            notes.append(f"{name}: {r['error']}")
        else:
            step_s = r["total_s"] / spec["steps"]
            gflops = flops[spec["loss"]]["total"] / step_s / 1e9
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.1f}x" if ref else "-"
            cells += [f"{r['tokens_per_s']:,.0f}", f"{gflops:,.1f}", speed]
            if peak:
                cells.append(f"{100 * gflops / (peak * 1e3):.3g}%")
            note = (f"{name}: {step_s * 1e3:,.0f} ms/step (min {r['step_min_s'] * 1e3:,.0f}, max "
                    f"{r['step_max_s'] * 1e3:,.0f}; CPU {r['cpu_s'] / spec['steps'] * 1e3:,.0f} ms/step), first step "
                    f"(compile/warm-up) {r['first_s']:.1f} s, first-step LM loss {r['loss0']:.6f}, peak RSS "
                    f"{r['peak_rss'] / 2**30:.2f} GiB, load {r['load']:.1f}; {r['backend']}")  # fmt: skip
            if "xla_flops" in r:
                note += f"; XLA cost_analysis of value_and_grad(loss): {r['xla_flops'] / 1e9:,.1f} GFLOP"
            if "forward_s" in r:
                note += (f"; forward loss alone {r['forward_s'] * 1e3:,.0f} ms, value_and_grad alone "
                         f"{r['value_and_grad_s'] * 1e3:,.0f} ms")  # fmt: skip
            notes.append(note)
        print("| " + " | ".join(cells) + " |")
    print()
    if peak:
        print(f"- MFU: model FLOP/s / {peak:g} TFLOP/s (dense bfloat16 peak of the device; every row, float32 too)")
    for loss, f in flops.items():
        print(f"- model FLOPs per step ({loss} loss): {f['total'] / 1e9:,.2f} G = matmul {f['matmul'] / 1e9:,.2f} "
              f"(N_train {f['n_train'] / 1e6:.2f}M, N_fwd {f['n_fwd'] / 1e6:.2f}M weights/token) + attention "
              f"{f['attention'] / 1e9:,.2f} + indexer {f['indexer'] / 1e9:,.2f}")  # fmt: skip
    print("\n".join(f"- {n}" for n in notes))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (the batch holds seq + 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles dsv4's step)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--dsv4-dtypes", nargs="*", default=["float32", "bfloat16"], help="LM-loss rows (compute_dtype)")
    p.add_argument("--full-loss-dtypes", nargs="*", default=["bfloat16"], help="full-loss rows (compute_dtype)")
    p.add_argument("--hf-dtypes", nargs="*", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--query-block", type=int, default=128, help="dsv4 query block (attention, indexer)")
    p.add_argument("--remat", action="store_true", help="dsv4: rematerialise every block (jax.checkpoint)")
    p.add_argument("--xla-flops", action="store_true", help="also report XLA's FLOP count (one more compile)")
    p.add_argument("--breakdown", action="store_true", help="also time dsv4's forward loss and value_and_grad alone")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per row")
    p.add_argument("--peak-tflops", type=float, help="MFU denominator (default: known GPUs' bf16 peak)")
    p.add_argument("--one", metavar="JSON", help="measure one row spec, print JSON")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="change config fields (JSON values)")
    args = p.parse_args(argv)
    args.changes = parse_changes(args.set)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the first step compiles)")
    return args


def main(argv=None) -> None:
    bench_main(argv, parse_args, lambda args: measure_one(json.loads(args.one)), main_table)


if __name__ == "__main__":
    main()
