"""Export faults planted on purpose: each gives a model (or an export patch) that computes something
other than the checkpoint, the kind of mistake an exporter makes. The validation must refuse every
one of them on every checkpoint (tests/test_family.py); docs/export.md has the measured margins.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch

import export.subgraphs as subgraphs


class SkippedBlock(torch.nn.Module):
    """A decoder layer whose update of the hidden states is lost (its keys and values still computed)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h, cos, sin, score_rows=None, past=None):
        _, saliency, kv = self.block(h, cos, sin, score_rows, past)
        return h, saliency, kv


class SkippedVisionLayer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        return (hidden_states, *out[1:]) if isinstance(out, tuple) else hidden_states


def layer_skipped(model, layer: int):
    bad = copy.deepcopy(model)
    bad.model.layers[layer] = SkippedBlock(bad.model.layers[layer])
    return bad


def vision_layer_skipped(model, layer: int = 0):
    bad = copy.deepcopy(model)
    layers = bad.model.vision_tower.vision_tower.vision_model.encoder.layers
    layers[layer] = SkippedVisionLayer(layers[layer])
    return bad


def rope_theta_wrong(model, theta: float):
    bad = copy.copy(model)  # shares the weights; only the config differs
    bad.cfg = replace(model.cfg, decoder=replace(model.cfg.decoder, rope_theta=theta))
    return bad


def weight_transposed(model, layer: int):
    bad = copy.deepcopy(model)
    proj = bad.model.layers[layer].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().t().contiguous(), requires_grad=False)
    return bad


@contextlib.contextmanager
def causal_attention():
    """The export patch's attention with a causal mask: the decoder is no longer bidirectional."""
    saved = subgraphs.explicit_attend

    def attend(q, k, v):
        n, m = q.shape[-2], k.shape[-2]
        scores = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype) @ v

    subgraphs.explicit_attend = attend
    try:
        yield
    finally:
        subgraphs.explicit_attend = saved


def weight_scaled(model, layer: int, factor: float):
    """Not an export fault: a checkpoint whose layer's MLP output is `factor` times larger (float16 overflows)."""
    bad = copy.deepcopy(model)
    proj = bad.model.layers[layer].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * factor, requires_grad=False)
    return bad
