"""The four exported subgraphs, each described declaratively (optimum-style).

    vision        pixel_values (tiles, 3, S, S)                      -> features (tiles, S'^2, D)
    decoder_pre   inputs_embeds (batch, seq, D), position_ids, score_rows (query),
                  past_keys, past_values (K, batch, H, past, Dh)
                                     -> hidden_states, saliency (batch, seq), present_keys, present_values
    decoder_post  hidden_states (batch, seq, D), position_ids, logit_rows (rows),
                  past_keys, past_values (L-K, batch, H, past, Dh)
                                     -> logits (batch, rows, vocab), present_keys, present_values
    similarity    hidden_states (batch, full_seq, D), visual_rows (visual), pivots (pivots)
                                     -> similarity (batch, pivots, visual)

The K/V tensors serve block KV caching (docs/caching.md) in the same graphs, so the weights are
held once: the seq rows computed attend to their own keys and values and to `past` cached ones
of other positions (past = 0: the whole sequence, a refresh or an uncached step); present_*
are the computed rows' keys (after RoPE) and values, per layer of the half.

decoder_pre holds layers [0, K), decoder_post layers [K, L) plus the final norm and LM head:
every weight lives in exactly one graph. decoder_pre serves step 1 on the full sequence and
every later step on the reduced one; its saliency comes from layer K-1's q.k for the score_rows
only (2*H*|rows|*N*Dh work, never the N x N map). decoder_post computes logits only for
logit_rows (the response), never for the whole sequence.

similarity serves the duplicate-aware pruning rule (runtime.pruning): the cosine similarity of
the pivots' hidden states entering layer K (pivots: indices into visual_rows, chosen on the host
from the saliency) to every visual token's, in float32. It reads decoder_pre's hidden states
where they are (on the device for TensorRT) and has no weights; the host gets (batch, pivots,
visual) floats, never the hidden states.

Named axes: tiles, batch (2 with CFG), seq, query, rows, past, full_seq (step 1's), visual, pivots. Their ranges come
from `export.profiles`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from export import model as model_math
from export.model import LladaV
from runtime.bundle import resolve_dims
from runtime.checks import random_feeds

FLOAT = "float"  # the precision's float type: float16 or float32
F32, I64 = "float32", "int64"


# max|got - ref| <= atol + rtol * max|reference| per output, per precision: relative to the output's
# scale (one fp16 ulp at |x| = 80 is already 0.06).
# int8, int4: a TensorRT engine against ONNX Runtime on the same Q/DQ graph (both int8 GEMMs; a rounding tie
# can move one activation by a quantization step): 5x fp16's bound, unverified on a device so far.
TOLERANCES = (("fp32", 1e-4, 1e-5), ("fp16", 1e-3, 1e-2), ("int8", 5e-3, 5e-2), ("int4", 5e-3, 5e-2))
# Saliency is a softmax average over ~N keys: its values are ~1/N (5e-4 at N=2000), so an absolute
# floor like 1e-3 would accept any order of the tokens. Relative to its own maximum only; measured
# ORT-vs-PyTorch errors: fp16 1.2-2.4e-3 of max, fp32 ~1e-6 (N = 48..2000).
SALIENCY_TOLERANCES = (("fp32", 0.0, 1e-4), ("fp16", 0.0, 1e-2), ("int8", 0.0, 5e-2), ("int4", 0.0, 5e-2))
# Cosine similarities in [-1, 1], computed in float32 from the same hidden states at every precision (TF32 off:
# export.engine_config): float32 rounding only, over sums of D products.
SIMILARITY_TOLERANCES = tuple((p, 0.0, 1e-4) for p in ("fp32", "fp16", "int8", "int4"))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # FLOAT, F32 or I64
    dims: tuple  # ints or axis names; "D", "V", "S", "F", "T" are model dims filled from the config
    tolerances: tuple = TOLERANCES  # outputs only: (precision, atol, rtol) for validation
    # outputs only: what picks tokens, judged by its kept set too: "saliency" (keep_by_score) or
    # "similarity" (keep_duplicate_aware, with the feeds' pivots)
    chooses: str = ""

    def resolve(self, dims: dict, float_dtype) -> tuple:
        return (float_dtype if self.dtype == FLOAT else self.dtype), resolve_dims(self.dims, dims)


@dataclass(frozen=True)
class SubgraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable[[LladaV, int], nn.Module]  # (model, k) -> module whose forward takes the inputs

    def tolerance(self, precision: str, output: str) -> tuple[float, float]:
        """(atol, rtol) for one output, checked as max|got - ref| <= atol + rtol * max|ref|."""
        t = next(t for t in self.outputs if t.name == output)
        return next((a, r) for p, a, r in t.tolerances if p == precision)

    def tolerances_for(self, precision: str) -> dict[str, list[float]]:
        """{output: [atol, rtol]}: what the manifest records, so the car checks engines by the same rule."""
        return {t.name: list(self.tolerance(precision, t.name)) for t in self.outputs}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(t.dims) if isinstance(d, str) and d not in MODEL_DIMS}
            if named:
                axes[t.name] = named
        return axes


# filled from the model config (and K: the layers of each decoder half), never dynamic
MODEL_DIMS = ("D", "V", "S", "F", "T", "Dv", "H", "Dh", "Lpre", "Lpost")


def model_dims(cfg, k: int | None = None) -> dict[str, int]:
    """The model dims tensors name; with the pruning layer k, also the layer counts of the halves."""
    g, d = cfg.geometry, cfg.decoder
    dims = {"D": d.d_model, "V": d.vocab_size, "S": g.image_size, "F": g.tokens_per_tile, "Dv": cfg.vision.d_model,
            "H": d.n_heads, "Dh": d.d_head}
    return dims if k is None else {**dims, "Lpre": k, "Lpost": d.n_layers - k}


class VisionGraph(nn.Module):
    def __init__(self, model: LladaV, k: int):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return (self.model.encode_tiles(pixel_values),)


def split_past(keys: torch.Tensor, values: torch.Tensor) -> list:
    """(layers, B, H, P, Dh) twice -> [(k, v)] per layer."""
    return [(keys[i], values[i]) for i in range(keys.shape[0])]


def stack_presents(presents: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([k for k, _ in presents]), torch.stack([v for _, v in presents])


class DecoderPre(nn.Module):
    def __init__(self, model: LladaV, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, inputs_embeds, position_ids, score_rows, past_keys, past_values):
        h, saliency, presents = self.model.run_layers_kv(inputs_embeds, position_ids, 0, self.k, score_rows,
                                                         split_past(past_keys, past_values))
        return (h, saliency, *stack_presents(presents))


class DecoderPost(nn.Module):
    def __init__(self, model: LladaV, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, hidden_states, position_ids, logit_rows, past_keys, past_values):
        h, _, presents = self.model.run_layers_kv(hidden_states, position_ids, self.k, self.model.cfg.n_layers,
                                                  past=split_past(past_keys, past_values))
        return (self.model.logits(h, logit_rows).to(model_math.at_least_float32(h.dtype)), *stack_presents(presents))


class PivotSimilarity(nn.Module):
    """The duplicate rule's similarities; no weights (k and the model only fix the hidden width)."""

    def __init__(self, model: LladaV, k: int):
        super().__init__()

    def forward(self, hidden_states, visual_rows, pivots):
        x = hidden_states[:, visual_rows]  # (B, Vis, D)
        x = x.to(model_math.at_least_float32(x.dtype))
        x = x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(1e-30))  # unit rows (a zero row stays 0)
        return (x[:, pivots] @ x.transpose(1, 2),)  # (B, M, Vis)


VISION = SubgraphSpec(
    "vision",
    inputs=(TensorSpec("pixel_values", FLOAT, ("tiles", 3, "S", "S")),),
    outputs=(TensorSpec("image_features", FLOAT, ("tiles", "F", "D")),),
    build=VisionGraph,
)
DECODER_PRE = SubgraphSpec(
    "decoder_pre",
    inputs=(
        TensorSpec("inputs_embeds", FLOAT, ("batch", "seq", "D")),
        TensorSpec("position_ids", I64, ("batch", "seq")),
        TensorSpec("score_rows", I64, ("query",)),
        TensorSpec("past_keys", FLOAT, ("Lpre", "batch", "H", "past", "Dh")),
        TensorSpec("past_values", FLOAT, ("Lpre", "batch", "H", "past", "Dh")),
    ),
    outputs=(
        TensorSpec("hidden_states", FLOAT, ("batch", "seq", "D")),
        TensorSpec("saliency", F32, ("batch", "seq"), SALIENCY_TOLERANCES, chooses="saliency"),
        TensorSpec("present_keys", FLOAT, ("Lpre", "batch", "H", "seq", "Dh")),
        TensorSpec("present_values", FLOAT, ("Lpre", "batch", "H", "seq", "Dh")),
    ),
    build=DecoderPre,
)
DECODER_POST = SubgraphSpec(
    "decoder_post",
    inputs=(
        TensorSpec("hidden_states", FLOAT, ("batch", "seq", "D")),
        TensorSpec("position_ids", I64, ("batch", "seq")),
        TensorSpec("logit_rows", I64, ("rows",)),
        TensorSpec("past_keys", FLOAT, ("Lpost", "batch", "H", "past", "Dh")),
        TensorSpec("past_values", FLOAT, ("Lpost", "batch", "H", "past", "Dh")),
    ),
    outputs=(
        TensorSpec("logits", F32, ("batch", "rows", "V")),
        TensorSpec("present_keys", FLOAT, ("Lpost", "batch", "H", "seq", "Dh")),
        TensorSpec("present_values", FLOAT, ("Lpost", "batch", "H", "seq", "Dh")),
    ),
    build=DecoderPost,
)
SIMILARITY = SubgraphSpec(
    "similarity",
    inputs=(
        TensorSpec("hidden_states", FLOAT, ("batch", "full_seq", "D")),
        TensorSpec("visual_rows", I64, ("visual",)),
        TensorSpec("pivots", I64, ("pivots",)),
    ),
    outputs=(TensorSpec("similarity", F32, ("batch", "pivots", "visual"), SIMILARITY_TOLERANCES, chooses="similarity"),),
    build=PivotSimilarity,
)
SUBGRAPHS = (VISION, DECODER_PRE, DECODER_POST, SIMILARITY)


def dummy_inputs(spec: SubgraphSpec, cfg, axes: dict[str, int], float_dtype, seed: int = 0,
                 k: int | None = None) -> dict:
    """Random feeds for `spec` at the given axis sizes (runtime.checks.random_feeds); k: the pruning
    layer, which sizes the decoders' K/V tensors."""
    dims = {**model_dims(cfg, k), **axes}
    return random_feeds([(t.name, *t.resolve(dims, float_dtype)) for t in spec.inputs], seed)


# ---------------------------------------------------------------- export-only patches


def explicit_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """MatMul -> Softmax -> MatMul, the pattern TensorRT 10.3 fuses; scores and softmax in float32."""
    scale = q.shape[-1] ** -0.5
    scores = ((q * scale) @ k.transpose(-1, -2)).float()
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def softmax_in_dtype(input, dim=None, _stacklevel=3, dtype=None):
    """F.softmax(x, dtype=float32) computed in float32. The TorchScript exporter would emit a
    float16 Softmax followed by a Cast (SigLIP's attention asks for float32 this way)."""
    if dtype is not None:
        input = input.to(dtype)
    return _SOFTMAX(input, dim=dim)


def layer_norm_float32(self, x):
    """nn.LayerNorm in float32 from primitives (ReduceMean, Sub, Mul, Sqrt, Div), cast back: SigLIP's
    norms stay float32 in fp16 graphs, and no LayerNormalization op reaches TensorRT 10.3, whose parser
    calls setComputePrecision on it, which strongly typed networks reject (docs/tensorrt.md)."""
    x32 = x.float()
    centred = x32 - x32.mean(-1, keepdim=True)
    # rsqrt and Mul (not Sqrt and Div): ONNX Runtime 1.2x's LayerNormFusion would fold the Div form back
    # into a LayerNormalization node whose types it then mixes (float16 scale, float32 input) and fail
    y = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + self.eps)
    if self.weight is not None:
        y = y * self.weight.float()
    if self.bias is not None:
        y = y + self.bias.float()
    return y.to(x.dtype)


_SOFTMAX = F.softmax


@contextlib.contextmanager
def export_patches():
    """While exporting: explicit float32 attention instead of SDPA, float32 softmax and LayerNorm
    for the vision tower. The model code stays untouched."""
    saved = model_math.attend, F.softmax, nn.LayerNorm.forward
    model_math.attend, F.softmax, nn.LayerNorm.forward = explicit_attend, softmax_in_dtype, layer_norm_float32
    try:
        yield
    finally:
        model_math.attend, F.softmax, nn.LayerNorm.forward = saved
