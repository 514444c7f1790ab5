"""Activation-aware scales for INT4 weights (AWQ, Lin et al. 2023), folded into the checkpoint.

A few input channels of each linear layer carry large activations; their weights matter more than
the rest, and round-to-nearest INT4 treats them alike. AWQ scales each input channel j of a linear
group (the layers that read the same x) by s_j = xbar_j^alpha (xbar_j: mean |x_j| over the
calibration rows), quantizes W diag(s) and feeds x / s, and searches alpha per group on a grid for
the least output error

    err(alpha) = sum over the group's layers of || Q(W diag(s)) (x / s)^T - W x^T ||^2

with Q calib.int4's quantizer (blocks of 128 input channels, scale max|block| / 7, float16 scales,
round to nearest). alpha = 0 is plain round to nearest, so the search never does worse on its rows.
The scales fold exactly as SmoothQuant's do (calib.smooth): into RMSNorm's weight for q/k/v and
gate/up, into v_proj's output rows for o_proj, into up_proj's output rows for down_proj.

Differences from the paper's code, on purpose: the loss is each linear layer's output (not the
whole attention or MLP block's), and weight clipping is not searched.
"""

from __future__ import annotations

import torch
from torch import nn

from calib.smooth import EPS, linears

GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
ROWS_PER_GROUP = 1024  # calibration rows kept per group for the search (spread over the feeds)


def fake_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """W (out, in) through blocked symmetric INT4 and back, as calib.int4.blocked_int4 stores it
    (its W^T (in, out) blocked along the input rows): float32."""
    from calib.int4 import weight_block

    out, inp = w.shape
    block = weight_block(inp, block)
    b = w.float().reshape(out, inp // block, block)
    scale = (b.abs().amax(-1, keepdim=True) / 7).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return ((b / scale).round().clamp(-8, 7) * scale).reshape(out, inp)


class GroupInputs:
    """Per (layer, group): mean |x_j| over every calibration row, and up to ROWS_PER_GROUP rows of x,
    taken evenly from each feed (what the search measures the error on)."""

    def __init__(self, rows_per_feed: int):
        self.rows_per_feed = rows_per_feed
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.rows: dict[tuple[int, str], list[torch.Tensor]] = {}

    def add(self, key: tuple[int, str], x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # (rows, in)
        self.sums[key] = self.sums.get(key, 0) + x.abs().sum(0)
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]
        pick = torch.linspace(0, x.shape[0] - 1, min(self.rows_per_feed, x.shape[0])).long()
        self.rows.setdefault(key, []).append(x[pick])

    def mean_abs(self, key) -> torch.Tensor:
        return self.sums[key] / self.counts[key]

    def sample(self, key) -> torch.Tensor:
        return torch.cat(self.rows[key])


@torch.no_grad()
def group_inputs(module: nn.Module, blocks: dict[int, nn.Module], feeds: list[dict], names: list[str]) -> GroupInputs:
    """What each linear group of `blocks` reads when `module` (a decoder half, inputs `names`) runs on the feeds."""
    stats = GroupInputs(max(1, ROWS_PER_GROUP // max(1, len(feeds))))
    hooks = []
    for i, block in blocks.items():
        lin = linears(block)
        for group in GROUPS:
            hooks.append(lin[group[0]].register_forward_pre_hook(lambda _, args, key=(i, group[0]): stats.add(key, args[0])))
    dtype = next(module.parameters()).dtype
    try:
        for feed in feeds:
            args = [torch.from_numpy(feed[n]) for n in names]
            module(*[x.to(dtype) if x.is_floating_point() else x for x in args])
    finally:
        for h in hooks:
            h.remove()
    return stats


def group_error(weights: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor, block: int) -> float:
    """sum_i || Q(W_i diag(s)) (x / s)^T - W_i x^T ||^2 over the group's weights (out, in); x (rows, in)."""
    err = 0.0
    xs = x / s
    for w in weights:
        w = w.float()
        err += float(((xs @ fake_int4(w * s, block).T - x @ w.T) ** 2).sum())
    return err


def search_scales(weights: list[torch.Tensor], mean_abs: torch.Tensor, x: torch.Tensor, block: int,
                  grid: int) -> tuple[torch.Tensor, float, dict]:
    """The s = xbar^alpha (normalised to a geometric mean of 1) of least group_error over alpha in
    {0, 1/grid, ..., (grid-1)/grid}. Returns (s, alpha, {'rtn': error at alpha 0, 'awq': best error})."""
    best = (None, 0.0, float("inf"))
    base = mean_abs.clamp(min=EPS)
    rtn = None
    for step in range(grid):
        alpha = step / grid
        s = base ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = group_error(weights, x, s, block)
        rtn = err if step == 0 else rtn
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], {"rtn": rtn, "awq": best[2]}


@torch.no_grad()
def apply_scales(block, group: tuple[str, ...], s: torch.Tensor) -> None:
    """Fold x / s into what produces the group's input and W diag(s) into its weights (in place)."""
    lin = linears(block)
    producer = {"q": block.input_layernorm, "gate": block.post_attention_layernorm}.get(group[0])
    if producer is not None:
        producer.weight.div_(s.to(producer.weight.dtype))
    else:
        prev = lin[{"o": "v", "down": "up"}[group[0]]]
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
    for name in group:
        lin[name].weight.mul_(s.to(lin[name].weight.dtype))


@torch.no_grad()
def awq(blocks: dict[int, nn.Module], stats: GroupInputs, block: int, grid: int) -> dict:
    """Search and fold the scales of every group of `blocks`. Returns the chosen alphas and the
    summed output errors (round to nearest vs AWQ) on the calibration rows, for the manifest."""
    alphas, rtn, best = {}, 0.0, 0.0
    for i, blk in blocks.items():
        lin = linears(blk)
        for group in GROUPS:
            key = (i, group[0])
            s, alpha, err = search_scales([lin[n].weight for n in group], stats.mean_abs(key), stats.sample(key), block, grid)
            apply_scales(blk, group, s)
            alphas[f"{i}.{'/'.join(group)}"] = alpha
            rtn, best = rtn + err["rtn"], best + err["awq"]
    return {"alphas": alphas, "output_error_rtn": rtn, "output_error_awq": best}
