"""LLaDA-V in pure PyTorch: the math only (no file I/O, no ONNX).

SigLIP vision tower (transformers' SiglipVisionModel, last layer dropped, features before
post_layernorm) -> mlp2x_gelu projector -> AnyRes merge with image_newline -> LLaDA-8B decoder
(RMSNorm in float32, RoPE, SwiGLU, fully bidirectional attention, untied head).

The decoder runs as any range of layers [lo, hi) with explicit position ids, because the export
splits it at the pruning layer K. Module names equal the checkpoint's key names, so
`state_dict()` keys are the Hugging Face keys (docs/architecture.md).

Shapes: B batch, N tokens, D hidden, H heads, Dh head dim, T tiles, S side of a tile grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.anyres import ANYRES, PAD, ImageGeometry, TileLayout

MINIATURE_VOCAB = 512  # its BPE (miniature/tokenizer.py) plus LLaDA-V's six special tokens


@dataclass(frozen=True)
class DecoderDims:
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    max_positions: int = 16384

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class VisionDims:
    d_model: int
    n_layers: int  # layers used: the tower's last layer is dropped, so checkpoint count - 1
    n_heads: int
    d_mlp: int
    image_size: int = 384
    patch_size: int = 14
    ln_eps: float = 1e-6
    act: str = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderDims
    vision: VisionDims
    geometry: ImageGeometry = field(default_factory=ImageGeometry)
    name: str = "llada-v"

    @property
    def n_layers(self) -> int:
        return self.decoder.n_layers


PRESETS = {
    # LLaDA-8B decoder + SigLIP so400m-patch14-384 (27 layers, 26 used), docs/architecture.md.
    "llada-v-8b": ModelConfig(
        DecoderDims(n_layers=32, d_model=4096, n_heads=32, d_mlp=12288, vocab_size=126464),
        VisionDims(d_model=1152, n_layers=26, n_heads=16, d_mlp=4304),
        name="llada-v-8b",
    ),
    # 32 layers so K=15 means what it means on the real model; the real 384/14 tile geometry so
    # token counts are real; a width small enough for the whole suite on 2 CPU cores.
    "tiny": ModelConfig(
        DecoderDims(n_layers=32, d_model=64, n_heads=4, d_mlp=128, vocab_size=406),
        VisionDims(d_model=32, n_layers=2, n_heads=2, d_mlp=64),
        name="tiny",
    ),
    # The trained miniature (miniature/): 32 layers for the same reason; 128-pixel tiles of 16-pixel
    # patches (8x8 tokens per tile), a grid of up to 3x3 tiles shrunk to anyres_max_2, so a 640x360
    # scene is 184 visual tokens and a 2-core CPU trains it in about two hours.
    "miniature": ModelConfig(
        DecoderDims(n_layers=32, d_model=128, n_heads=4, d_mlp=256, vocab_size=MINIATURE_VOCAB),
        VisionDims(d_model=96, n_layers=3, n_heads=3, d_mlp=256, image_size=128, patch_size=16),
        ImageGeometry(
            image_size=128,
            patch_size=16,
            grid_pinpoints=tuple((128 * i, 128 * j) for i in range(1, 4) for j in range(1, 4)),
            max_tiles=2,
        ),
        name="miniature",
    ),
}



# ---------------------------------------------------------------- decoder math


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(at_least_float32(x.dtype))  # float32 (float64 stays float64: a widened reference)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rope_cos_sin(pos: torch.Tensor, d_head: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, N) -> cos, sin (B, N, Dh) in float32 (float64 for a widened reference), non-interleaved halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).to(dtype) / d_head))
    freqs = pos.to(dtype)[..., None] * inv_freq  # (B, N, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim; `half` is a Python int so exports slice by constants."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, Dh); cos, sin (B, N, Dh)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x, int(x.shape[-1]) // 2) * sin


class Attention(nn.Module):
    """Bidirectional multi-head attention: no causal mask (batch rows are never padded)."""

    def __init__(self, dims: DecoderDims):
        super().__init__()
        d, self.n_heads, self.d_head = dims.d_model, dims.n_heads, dims.d_head
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, Dh)
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x, cos, sin, score_rows=None, past=None):
        """x (B, N, D) -> (B, N, D); the visual saliency (B, N) when score_rows is given; x's own keys
        (after RoPE) and values (B, H, N, Dh). past: keys and values (B, H, P, Dh) of P other
        positions that x's rows attend to beside their own (no mask: the order does not matter)."""
        q = apply_rope(self._heads(self.q_proj(x)), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = attend(q, keys, values).transpose(1, 2).reshape(x.shape)
        # saliency over x's own keys (a softmax over those only): pruning scores step 1, which has no past
        saliency = None if score_rows is None else attention_saliency(q, k, score_rows)
        return self.o_proj(out), saliency, (k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q.k^T / sqrt(Dh)) v over (B, H, N, Dh), no mask: every token sees every token.

    SDPA here; the ONNX export swaps in explicit MatMul/Softmax/MatMul with float32 casts.
    """
    return F.scaled_dot_product_attention(q, k, v)


def attention_saliency(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over heads and query rows of softmax(q_rows . k^T / sqrt(Dh)): (B, N) in float32 (or wider).

    Only |rows| rows of the attention map are formed: cost 2*H*|rows|*N*Dh.
    """
    scale = q.shape[-1] ** -0.5
    scores = ((q[:, :, rows] * scale) @ k.transpose(-1, -2)).to(at_least_float32(q.dtype))
    return torch.softmax(scores, dim=-1).mean(dim=(1, 2))  # (B, H, Q, N) -> (B, N)


class MLP(nn.Module):
    def __init__(self, dims: DecoderDims):
        super().__init__()
        self.gate_proj = nn.Linear(dims.d_model, dims.d_mlp, bias=False)
        self.up_proj = nn.Linear(dims.d_model, dims.d_mlp, bias=False)
        self.down_proj = nn.Linear(dims.d_mlp, dims.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dims: DecoderDims):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.d_model, dims.rms_eps)
        self.self_attn = Attention(dims)
        self.post_attention_layernorm = RMSNorm(dims.d_model, dims.rms_eps)
        self.mlp = MLP(dims)

    def forward(self, h, cos, sin, score_rows=None, past=None):
        """h (B, N, D) -> h, saliency (or None), x's keys and values (Attention.forward)."""
        a, saliency, kv = self.self_attn(self.input_layernorm(h), cos, sin, score_rows, past)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), saliency, kv


# ---------------------------------------------------------------- vision side


def siglip_config(v: VisionDims):
    from transformers import SiglipVisionConfig

    cfg = SiglipVisionConfig(
        hidden_size=v.d_model,
        intermediate_size=v.d_mlp,
        num_hidden_layers=v.n_layers,
        num_attention_heads=v.n_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.act,
        layer_norm_eps=v.ln_eps,
        vision_use_head=False,
    )
    cfg._attn_implementation = "eager"  # plain MatMul/Softmax math, the same on every backend
    return cfg


class SiglipHolder(nn.Module):
    """Places SigLIP's transformer at `.vision_model`, the checkpoint's module path.

    transformers 4.x nests it as SiglipVisionModel.vision_model; 5.x flattened the class. Either
    way the transformer (embeddings, encoder, post_layernorm) ends up here.
    """

    def __init__(self, v: VisionDims):
        super().__init__()
        from transformers import SiglipVisionModel

        model = SiglipVisionModel(siglip_config(v))
        self.vision_model = getattr(model, "vision_model", model)


class VisionTower(nn.Module):
    def __init__(self, v: VisionDims):
        super().__init__()
        self.vision_tower = SiglipHolder(v)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, 384, 384) -> (T, 729, Dv): last used layer's output, before post_layernorm."""
        vm = self.vision_tower.vision_model
        h = vm.embeddings(pixels)
        return vm.encoder(inputs_embeds=h).last_hidden_state


def merge_anyres(feats: torch.Tensor, layout: TileLayout, newline: torch.Tensor) -> torch.Tensor:
    """Projected tile features (T, S*S, D) -> visual tokens (V, D) per LLaDA-V spatial_unpad.

    The global tile comes first; the grid is un-padded, bilinearly shrunk if needed, and gets
    `newline` after every row.
    """
    base = feats[0]
    if layout.mode == PAD:  # one view of several images (LLaDA-V's "pad"): its features, then the newline
        return torch.cat((base, newline[None].to(base.dtype)), dim=0)
    if layout.mode != ANYRES:
        return base
    across, down = layout.grid
    side = math.isqrt(feats.shape[1])
    d = feats.shape[-1]
    grid = feats[1:].view(down, across, side, side, d).permute(4, 0, 2, 1, 3)
    grid = grid.reshape(d, down * side, across * side)  # (D, rows, cols)
    rows, cols = layout.unpadded
    r0, c0 = (grid.shape[1] - rows) // 2, (grid.shape[2] - cols) // 2
    grid = grid[:, r0 : r0 + rows, c0 : c0 + cols]
    if layout.merged != layout.unpadded:
        grid = F.interpolate(grid[None], size=list(layout.merged), mode="bilinear")[0]
    nl = newline[:, None, None].expand(d, grid.shape[1], 1).to(grid.dtype)
    grid = torch.cat((grid, nl), dim=-1)  # (D, rows, cols + 1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


# ---------------------------------------------------------------- the whole model


class Backbone(nn.Module):
    """The checkpoint's `model.*` namespace."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dec = cfg.decoder
        self.embed_tokens = nn.Embedding(dec.vocab_size, dec.d_model)
        self.layers = nn.ModuleList(Block(dec) for _ in range(dec.n_layers))
        self.norm = RMSNorm(dec.d_model, dec.rms_eps)
        self.vision_tower = VisionTower(cfg.vision)
        self.mm_projector = nn.Sequential(
            nn.Linear(cfg.vision.d_model, dec.d_model), nn.GELU(), nn.Linear(dec.d_model, dec.d_model)
        )
        self.image_newline = nn.Parameter(torch.zeros(dec.d_model))


class LladaV(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.decoder.d_model, cfg.decoder.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, 384, 384) -> projected tile features (T, 729, D)."""
        return self.model.mm_projector(self.model.vision_tower(pixels.to(self.dtype)))

    def visual_tokens(self, pixels: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        """(T, 3, 384, 384) -> (V, D) visual embeddings for the decoder."""
        return merge_anyres(self.encode_tiles(pixels), layout, self.model.image_newline)

    def run_layers(self, h, pos, lo: int, hi: int, score_rows=None):
        """Decoder layers [lo, hi) over h (B, N, D) at positions pos (B, N).

        With score_rows, also returns the saliency (B, N) from layer hi-1's q.k (docs/pruning.md).
        """
        h, saliency, _ = self.run_layers_kv(h, pos, lo, hi, score_rows)
        return h, saliency

    def run_layers_kv(self, h, pos, lo: int, hi: int, score_rows=None, past=None):
        """run_layers that also returns each layer's keys and values of h's rows ([(k, v)] for layers
        lo..hi-1, (B, H, N, Dh)); past: [(k, v)] per layer of other positions (B, H, P, Dh) that h's
        rows attend to as well (a KV cache: docs/caching.md)."""
        cos, sin = rope_cos_sin(pos, self.cfg.decoder.d_head, self.cfg.decoder.rope_theta, at_least_float32(h.dtype))
        saliency, presents = None, []
        for i in range(lo, hi):
            rows = score_rows if i == hi - 1 else None
            h, s, kv = self.model.layers[i](h, cos, sin, rows, None if past is None else past[i - lo])
            saliency = s if s is not None else saliency
            presents.append(kv)
        return h, saliency, presents

    def logits(self, h: torch.Tensor, rows=None) -> torch.Tensor:
        """Final norm and LM head, for the given sequence rows only (all rows if None)."""
        if rows is not None:
            h = h[:, rows]
        return self.lm_head(self.model.norm(h))

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The unsplit decoder: embeddings (B, N, D) -> logits (B, N, vocab)."""
        return self.logits(self.run_layers(h, pos, 0, self.cfg.n_layers)[0])
