"""What a compiled program moves between devices: collectives parsed from HLO text, and a lower bound.

`collectives(hlo_text)` lists every collective instruction of a compiled program with its shapes,
group size and the bytes one device sends over the links under the usual bandwidth-optimal
algorithms ("wire bytes"):

    all-reduce        2 (p-1)/p x S      (reduce-scatter + all-gather)
    all-gather        (p-1)/p x S        (S = the gathered result)
    reduce-scatter    (p-1)/p x S        (S = the operand)
    all-to-all        (p-1)/p x S        (S = the operand: 1/p of it stays)
    collective-permute  S per non-trivial source -> target pair

`minimum_bytes` is the analytic lower bound for one decode step of a strategy: only token
activations move (never weights), and only what the layout forces:

- tokens replicated over the expert devices (dp_ep, tp_ep): a device holding a token must
  receive, per MoE layer, one D-vector (float32: the experts' outputs are summed in float32)
  for every token with at least one expert elsewhere; tensor-parallel heads add one D-vector per
  token for the attention output and, per CSA layer, the indexer's summed scores of the
  max_len / 4 entries (its heads are split);
- tokens split over the expert devices (dp_ep_a2a): each token goes to each other device that
  holds one of its experts and one D-vector comes back: 2 U D per token, U = (ep-1) x P(a given
  other device holds one of the K experts) under uniform routing.
"""

from __future__ import annotations

import dataclasses
import math
import re

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f8e4m3fn": 1, "f8e5m2": 1, "s8": 1, "u8": 1, "pred": 1}  # fmt: skip
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+(" + "|".join(OPS) + r")(?:-start)?\((.*)$")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: op, result shapes [(dtype, dims)], group size, wire bytes per device."""

    op: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group: int
    wire_bytes: float
    text: str

    @property
    def result_bytes(self) -> int:
        """Total bytes of the result shapes (a dtype missing from the table counts 4 bytes per element)."""
        return sum(_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in self.shapes)


def _shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text))


def _group_size(line: str, n_devices: int) -> int:
    """Devices per replica group, from any of the three HLO spellings of replica_groups."""
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return n_devices


def _wire(op: str, result_bytes: int, p: int, line: str) -> float:
    if op == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1])
        moving = sum(a != b for a, b in pairs)
        return result_bytes * moving / max(len(pairs), 1)
    if p <= 1:
        return 0.0
    if op == "all-reduce":
        return 2 * (p - 1) / p * result_bytes
    if op == "reduce-scatter":
        return (p - 1) * result_bytes
    return (p - 1) / p * result_bytes  # all-gather, all-to-all, ragged-all-to-all (buffer size)


def _start_results(shapes):
    """An async all-gather or collective-permute start returns (operands, results[, u32[] flags]),
    each half one array or a tuple of them (a combined collective): the results."""
    arrays = [x for x in shapes if x[1] or x[0] != "u32"]  # the flags are u32 scalars
    return tuple(arrays[len(arrays) // 2 :])


def collectives(hlo_text: str, n_devices: int = 1) -> list[Collective]:
    """Every collective of a compiled HLO module (async pairs counted once, at their start)."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or "-done" in line.split("=", 1)[1].split("(", 1)[0]:
            continue
        result, op = m.group(1), m.group(2)
        shapes = _shapes(result)
        if f"{op}-start(" in line and op in ("all-gather", "collective-permute"):
            shapes = _start_results(shapes)
        p = _group_size(line, n_devices)
        size = sum(_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in shapes)
        out.append(Collective(op, shapes, p, _wire(op, size, p, line), line.strip()))
    return out


def expert_weight_gathers(found: list[Collective], hidden: int, expert_hidden: int) -> list[Collective]:
    """All-gathers whose result is shaped like stacked expert weights [..., D, F] or [..., F, D] (rank >= 3)."""
    bad = []
    for c in found:
        if c.op != "all-gather":
            continue
        for _, dims in c.shapes:
            if len(dims) >= 3 and set(dims[-2:]) == {hidden, expert_hidden}:
                bad.append(c)
    return bad


# ---------------------------------------------------------------------------------- lower bound


def p_holds_one(n_experts: int, local: int, k: int) -> float:
    """P(a given device holding `local` of `n_experts` experts holds at least one of k distinct choices)."""
    return 1.0 - math.comb(n_experts - local, k) / math.comb(n_experts, k)


def minimum_bytes(cfg, mesh, strategy, batch: int, max_len: int, act_bytes: int = 4) -> dict[str, float]:
    """Analytic per-device wire bytes one decode step must move, by part ("moe", "attention").

    `max_len`: the cache length (a CSA indexer scores max_len / 4 entries per query); `act_bytes`:
    bytes per activation value (the runtime dtype).
    """
    from sharding.mesh import axis_size
    from sharding.rules import get_strategy

    strat = get_strategy(strategy)
    ep = axis_size(mesh, strat.mesh_axes("experts", mesh))
    tp = axis_size(mesh, strat.mesh_axes("heads", mesh))
    rows = batch // axis_size(mesh, strat.mesh_axes("batch", mesh))  # tokens a device holds (one per sequence)
    e, k, d, layers = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.num_hidden_layers
    moe = 0.0
    split = set(strat.mesh_axes("experts", mesh)) <= set(strat.mesh_axes("batch", mesh))
    if ep > 1 and not split:  # tokens already on every expert device: only the sums must arrive
        p_all_local = math.comb(e // ep, k) / math.comb(e, k)
        moe = layers * rows * d * 4 * (1 - p_all_local)
    elif ep > 1:  # each token to the U other devices holding its experts, one sum back from each
        u = (ep - 1) * p_holds_one(e, e // ep, k)
        moe = layers * rows * u * d * (act_bytes + 4)  # activations out, float32 sums back
    attention = 0.0
    if tp > 1:
        csa = sum(cfg.compress_ratios[i] == 4 for i in range(layers))
        attention = layers * rows * d * act_bytes + csa * rows * (max_len // 4) * 4  # out-proj sums, index scores
    return {"moe": moe, "attention": attention}
