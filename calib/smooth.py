"""SmoothQuant-style migration of activation outliers into weights, exact in real arithmetic.

A linear layer y = x W^T with per-input-channel activation maxima a_j and weight maxima w_j
(max over output rows of |W[:, j]|) is rewritten as y = (x / s) (W diag(s))^T with

    s_j = a_j^alpha / w_j^(1 - alpha)

so per-tensor INT8 activations lose less to a few large channels, while the weights (quantized
per output channel) take on part of the range. x / s is folded into what produces x, so the
model computes the same function and no op is added:

    q, k, v       <- input_layernorm.weight / s        (RMSNorm's weight is per channel)
    gate, up      <- post_attention_layernorm.weight / s
    o_proj        <- v_proj's output rows / s          (attention is linear in v, per channel: MHA)
    down_proj     <- up_proj's output rows / s         (silu(gate) * up is linear in up, per channel)

alpha = 0 leaves the model as it is (s = 1 / w^1 would move range into the weights: not used).
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


def linears(block) -> dict[str, nn.Linear]:
    a, m = block.self_attn, block.mlp
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj, "up": m.up_proj,
            "down": m.down_proj}


@torch.no_grad()
def input_maxima(module: nn.Module, blocks: dict[int, nn.Module], feeds: list[dict],
                 names: list[str]) -> dict[tuple[int, str], torch.Tensor]:
    """Per (layer, linear) the max |x| of each input channel over every row of every feed: what the
    linear layers of `blocks` see when `module` (a decoder half, inputs `names`) runs on the feeds."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in blocks.items():
        for name, lin in linears(block).items():
            def hook(_, args, key=(i, name)):
                m = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(0)
                out[key] = torch.maximum(out[key], m) if key in out else m
            hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for feed in feeds:
            args = [torch.from_numpy(feed[n]) for n in names]
            module(*[x.to(module_dtype(module)) if x.is_floating_point() else x for x in args])
    finally:
        for h in hooks:
            h.remove()
    return out


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1-alpha), w_j the max |W[:, j]| over the layers that share the input."""
    w = torch.stack([x.abs().float().amax(0) for x in weights]).amax(0)
    return (act_max.clamp(min=EPS) ** alpha / w.clamp(min=EPS) ** (1 - alpha)).clamp(min=EPS)


@torch.no_grad()
def smooth_block(block, maxima: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold the four migrations into one decoder block's weights (in place)."""
    lin = linears(block)
    for norm, group in ((block.input_layernorm, ("q", "k", "v")), (block.post_attention_layernorm, ("gate", "up"))):
        s = scales(maxima[group[0]], [lin[n].weight for n in group], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        for n in group:
            lin[n].weight.mul_(s.to(lin[n].weight.dtype))
    for producer, consumer in (("v", "o"), ("up", "down")):
        s = scales(maxima[consumer], [lin[consumer].weight], alpha)
        lin[producer].weight.div_(s[:, None].to(lin[producer].weight.dtype))
        lin[consumer].weight.mul_(s.to(lin[consumer].weight.dtype))


def smooth(blocks: dict[int, nn.Module], maxima: dict[tuple[int, str], torch.Tensor], alpha: float) -> None:
    """Smooth every block of `blocks` with the maxima input_maxima measured."""
    if alpha == 0:
        return
    for i, block in blocks.items():
        smooth_block(block, {name: maxima[i, name] for name in linears(block)}, alpha)
