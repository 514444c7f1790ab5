"""The decoder math against straightforward independent computations (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.model import RMSNorm, apply_rope, rope_cos_sin

RNG = np.random.default_rng(0)


def np_rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, pos, theta, angle_dtype=np.float64):
    """Rotate each pair (i, i + Dh/2) by angle pos * theta^(-2i/Dh), one pair at a time.

    LLaDA computes the angles in float32 on purpose ("bfloat16 loses precision on long
    contexts"); angle_dtype=float32 rounds them the same way, the rest stays float64.
    """
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for i in range(half):
        t = angle_dtype
        inv_freq = t(1.0) / (t(theta) ** (t(2 * i) / t(x.shape[-1])))
        angle = (pos.astype(t) * inv_freq).astype(np.float64)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]  # (N, 1) against (N, H)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def np_block_input_qkv(layer, h, pos, theta):
    """q, k, v (H, N, Dh) of one decoder layer from its input hidden states h (N, D), in float64."""
    att = layer.self_attn
    w = {n: getattr(att, n).weight.double().numpy() for n in ("q_proj", "k_proj", "v_proj")}
    x = np_rmsnorm(h, layer.input_layernorm.weight.double().numpy(), layer.input_layernorm.eps)
    n, heads, dh = h.shape[0], att.n_heads, att.d_head
    q = (x @ w["q_proj"].T).reshape(n, heads, dh)
    k = (x @ w["k_proj"].T).reshape(n, heads, dh)
    v = (x @ w["v_proj"].T).reshape(n, heads, dh)
    q, k = np_rope(q, pos, theta), np_rope(k, pos, theta)
    return q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)


def np_attention_map(q, k):
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)  # (H, N, N)


def test_rmsnorm_matches_independent():
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(RNG.normal(size=64)))
    x = RNG.normal(size=(3, 5, 64)) * 10
    got = norm(torch.from_numpy(x).float()).detach().double().numpy()
    want = np_rmsnorm(x, norm.weight.double().detach().numpy(), 1e-5)
    assert np.max(np.abs(got - want)) < 1e-4


def test_rmsnorm_computes_in_float32_for_half_inputs():
    norm = RMSNorm(64, 1e-5).half()  # a half-precision model has half-precision norm weights
    x = torch.full((1, 64), 300.0, dtype=torch.float16)  # x^2 = 9e4 overflows float16
    out = norm(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.ones(1, 64), atol=1e-3)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_independent(theta):
    pos = np.array([0, 1, 7, 100, 4000, 16383])
    x = RNG.normal(size=(1, 2, pos.size, 16))
    cos, sin = rope_cos_sin(torch.from_numpy(pos)[None], 16, theta)
    got = apply_rope(torch.from_numpy(x).float(), cos, sin).double().numpy()[0]  # (H, N, Dh)
    want = np_rope(x[0].transpose(1, 0, 2), pos, theta, np.float32).transpose(1, 0, 2)
    assert np.max(np.abs(got - want)) < 1e-5
    exact = np_rope(x[0].transpose(1, 0, 2), pos, theta).transpose(1, 0, 2)  # float64 angles
    assert np.max(np.abs(got - exact)[:, :4]) < 1e-5  # positions < 128: float32 angles are exact enough


def test_layer_matches_independent(tiny):
    """One whole decoder layer (norm, RoPE, bidirectional attention, SwiGLU) in float64 numpy."""
    model, _ = tiny
    layer, theta = model.model.layers[3], model.cfg.decoder.rope_theta
    n = 40
    h = RNG.normal(size=(n, 64))
    pos = np.arange(n) * 3  # positions need not be contiguous (pruned sequences)
    q, k, v = np_block_input_qkv(layer, h, pos, theta)
    attn = (np_attention_map(q, k) @ v).transpose(1, 0, 2).reshape(n, 64)
    h1 = h + attn @ layer.self_attn.o_proj.weight.double().numpy().T
    x = np_rmsnorm(h1, layer.post_attention_layernorm.weight.double().numpy(), 1e-5)
    mlp = layer.mlp
    gate = x @ mlp.gate_proj.weight.double().numpy().T
    up = x @ mlp.up_proj.weight.double().numpy().T
    want = h1 + (gate / (1 + np.exp(-gate)) * up) @ mlp.down_proj.weight.double().numpy().T
    got, _ = model.run_layers(torch.from_numpy(h).float()[None], torch.from_numpy(pos)[None], 3, 4)
    err = np.max(np.abs(got[0].double().numpy() - want))
    print(f"layer max |diff| = {err:.2e}")
    assert err < 1e-4


def test_decoder_is_bidirectional(tiny):
    model, _ = tiny
    n = 30
    h = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(n)[None]
    base, _ = model.run_layers(h, pos, 0, 32)
    h2 = h.clone()
    h2[0, -1] += 1.0  # perturb the last token only
    out, _ = model.run_layers(h2, pos, 0, 32)
    assert (out[0, 0] - base[0, 0]).abs().max() > 1e-3  # the first position sees the last


def test_split_halves_equal_the_unsplit_decoder(tiny):
    model, _ = tiny
    h = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(50)[None].expand(2, -1)
    full = model(h, pos)
    for k in (1, 3, 15, 31):
        mid, _ = model.run_layers(h, pos, 0, k)
        out, _ = model.run_layers(mid, pos, k, 32)
        assert torch.equal(model.logits(out), full), k


def test_saliency_equals_rows_of_the_explicit_attention_map(tiny):
    """Saliency from q.k of layer K-1 for the query rows == the full N x N map read at those rows."""
    model, _ = tiny
    n, k_layer = 60, 15
    h = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(n)[None]
    rows = torch.tensor([41, 50, 55, 59])
    captured = {}
    hook = model.model.layers[k_layer - 1].register_forward_pre_hook(lambda m, a: captured.update(h=a[0]))
    try:
        _, saliency = model.run_layers(h, pos, 0, k_layer, score_rows=rows)
    finally:
        hook.remove()
    q, k, _ = np_block_input_qkv(model.model.layers[k_layer - 1], captured["h"][0].double().numpy(), np.arange(n),
                                 model.cfg.decoder.rope_theta)
    full_map = np_attention_map(q, k)  # (H, N, N), every row
    want = full_map[:, rows.numpy(), :].mean(axis=(0, 1))
    err = np.max(np.abs(saliency[0].double().numpy() - want))
    print(f"saliency max |diff| = {err:.2e}")
    assert saliency.shape == (1, n) and err < 1e-6
    assert abs(saliency[0].sum().item() - 1.0) < 1e-5  # a mean of probability rows
