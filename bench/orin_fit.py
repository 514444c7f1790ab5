"""What fits where on Orin: LLaDA-V-8B weight bytes per graph and precision, activation peaks at
the profile's maximum shapes, and the compute floor of a denoising step at FP16 and INT8.

    python -m bench.orin_fit                 # K=15, default profile (AnyRes, 256 text, 128 response)
    python -m bench.orin_fit --max-image 1920x1080   # engines sized for the camera frame (--max-image)
    python -m bench.orin_fit --cameras 4             # engines sized for a 4-camera rig (--cameras)

Parameter counts come from the 8B architecture instantiated on the meta device (no weights).
Bytes per precision follow the schemes of calib/ (docs/quantization.md):
  fp16  2 B per parameter everywhere
  int8  decoder linears 1 B per weight + one fp16 scale per output channel; norms, LM head and the
        vision tower fp16 (the int8 bundle's scheme)
  int4  decoder linears 0.5 B per weight + one fp16 scale per block of 128 (W4A16, AWQ's layout);
        LM head and vision fp16 (ModelOpt's default leaves the LM head out)
The token embeddings live in host memory (`host/embed_tokens.npy`), which on Orin is the same
LPDDR5 as the GPU's: they count. Activation peaks are estimates from the tensors one layer keeps
live at the maximum sequence; 'unfused' adds the N x N attention scores (float32) and
probabilities (fp16) of the explicit MatMul-Softmax-MatMul, 'fused' is what remains if TensorRT
fuses attention and never forms them. Whether it fuses is measured on the device
(jetson/latency.py), not here. The decoders' K/V buffers (docs/caching.md) count too: the full
profile's present K/V (every layer's keys and values at the longest sequence, fp16) are written at
every step, cached or not; the cached-step profile's past K/V (the cache) are as large again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace


# unified LPDDR5 (GB = 1e9 B) and dense throughput; Nano: the JetPack 6.1+ "Super" clocks (67 sparse INT8 TOPS)
DEVICES = {"AGX Orin 64GB": 64e9, "Orin NX 16GB": 16e9, "Orin Nano 8GB": 8e9}
RESERVE = 2.5e9  # OS, CUDA context, TensorRT and cuBLAS workspaces: an assumption; tegrastats measures it
PRECISIONS = ("fp16", "int8", "int4")
BLOCK = 128


@dataclass(frozen=True)
class GraphParams:
    linear: int  # decoder linear weights (quantizable)
    out_channels: int  # sum of the decoder linears' output channels (one int8 scale each)
    other: int  # everything else, kept fp16


def param_counts(k: int) -> dict[str, GraphParams]:
    """Per graph (and the host embeddings) of the 8B, from the architecture on the meta device."""
    import torch

    from export.model import PRESETS, LladaV

    with torch.device("meta"):
        model = LladaV(PRESETS["llada-v-8b"])
    m = model.model

    def numel(modules) -> int:
        return sum(p.numel() for mod in modules for p in mod.parameters())

    def decoder(layers, extra) -> GraphParams:
        lin = [mod for layer in layers for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
        return GraphParams(numel(lin), sum(x.out_features for x in lin), numel(layers) - numel(lin) + numel(extra))

    return {
        "vision": GraphParams(0, 0, numel([m.vision_tower, m.mm_projector])),
        "decoder_pre": decoder(list(m.layers[:k]), []),
        "decoder_post": decoder(list(m.layers[k:]), [m.norm, model.lm_head]),
        "host embeddings": GraphParams(0, 0, numel([m.embed_tokens]) + m.image_newline.numel()),
    }


def weight_bytes(g: GraphParams, precision: str) -> float:
    if precision == "fp16":
        return 2 * (g.linear + g.other)
    if precision == "int8":
        return g.linear + 2 * g.out_channels + 2 * g.other
    return g.linear / 2 + 2 * g.linear / BLOCK + 2 * g.other


def decoder_activation_bytes(n: int, d: int, m: int, heads: int) -> tuple[float, float]:
    """(fused, unfused) peak bytes one decoder layer keeps live at sequence n, batch 1, fp16 tensors:
    residual, normed input, q, k, v, attention output (6 n d), gate, up and their product (3 n m);
    unfused adds the scores (float32) and probabilities (fp16), heads x n x n each."""
    fused = 2 * (6 * n * d + 3 * n * m)
    return fused, fused + heads * n * n * (4 + 2)


def kv_buffer_bytes(n: int, layers: int, d: int) -> float:
    """One set of K/V buffers over both decoder halves: keys and values of every layer at sequence n,
    batch 1, fp16 (heads x head dim = d). The TensorRT backend holds two: the full profile's present
    outputs and the cached profile's past inputs."""
    return 2 * layers * n * d * 2


def vision_activation_bytes(tiles: int, tokens: int, d: int, m: int, heads: int) -> tuple[float, float]:
    """Every tile at once: the same accounting per tile (attention over 729 tokens per tile and head)."""
    fused, unfused = decoder_activation_bytes(tokens, d, m, heads)
    return tiles * fused, tiles * unfused


def floor(w, k: int, p: float, peak: dict, precision: str) -> float:
    """Seconds of one later denoising step (the reduced sequence when p > 0) at dense peak: linear
    layers at `precision`, attention and the LM head at FP16."""
    from bench.flops import linear_macs, step_flops
    from runtime.pruning import pruned_count

    n = w.n - pruned_count(w.visual, p)
    linear = w.layers * 2 * linear_macs(n, w.d, w.m)
    _, total = step_flops(w, k if p else None, p)
    return linear / peak[precision] + (total - linear) / peak["fp16"]


def report(k: int, max_seq: int, max_tiles: int, visual: int, text: int, gen: int) -> str:
    from bench.flops import ORIN, Workload
    from export.model import PRESETS

    cfg = PRESETS["llada-v-8b"]
    dec, vis = cfg.decoder, cfg.vision
    counts = param_counts(k)
    lines = [f"LLaDA-V-8B, K={k}: weight bytes per graph (GB = 1e9 B)", "",
             f"{'graph':<17} {'params':>8} " + " ".join(f"{p:>8}" for p in PRECISIONS)]
    totals = dict.fromkeys(PRECISIONS, 0.0)
    for name, g in counts.items():
        row = {p: weight_bytes(g, p) for p in PRECISIONS}
        for p in PRECISIONS:
            totals[p] += row[p]
        lines.append(f"{name:<17} {(g.linear + g.other) / 1e9:>7.2f}B " + " ".join(f"{row[p] / 1e9:>8.2f}" for p in PRECISIONS))
    dec_fp16 = sum(weight_bytes(counts[n], "fp16") for n in ("decoder_pre", "decoder_post"))
    for p in PRECISIONS:
        ratio = sum(weight_bytes(counts[n], p) for n in ("decoder_pre", "decoder_post")) / dec_fp16
        lines.append(f"  decoder ({p}) / decoder (fp16): {ratio:.3f}")
    fused, unfused = decoder_activation_bytes(max_seq, dec.d_model, dec.d_mlp, dec.n_heads)
    vis_fused, vis_unfused = vision_activation_bytes(max_tiles, cfg.geometry.tokens_per_tile, vis.d_model, vis.d_mlp,
                                                     vis.n_heads)
    kv = 2 * kv_buffer_bytes(max_seq, dec.n_layers, dec.d_model)
    lines += ["", f"activation peak at the profile's maxima (decoder at seq {max_seq}, vision at {max_tiles} tiles): "
                  f"decoder {fused / 1e9:.2f} GB with fused attention, {unfused / 1e9:.2f} GB unfused; vision "
                  f"{vis_fused / 1e9:.2f} / {vis_unfused / 1e9:.2f} GB. Each engine holds its own: both decoders count.",
              f"K/V buffers at seq {max_seq}: {kv / 2e9:.2f} GB of present K/V (full profile, every step) + "
              f"{kv / 2e9:.2f} GB of cached K/V (cached-step profile; not allocated with --cache none) = "
              f"{kv / 1e9:.2f} GB", "",
              f"fits? weights + host embeddings + activations + K/V buffers + {RESERVE / 1e9:.1f} GB reserve, in GB "
              "(attention fused / unfused)",
              f"{'device':<15} " + " ".join(f"{p:>15}" for p in PRECISIONS)]
    need = {p: [totals[p] + 2 * a + v + kv + RESERVE for a, v in ((fused, vis_fused), (unfused, vis_unfused))]
            for p in PRECISIONS}
    for dev, ram in DEVICES.items():
        cells = " ".join(f"{'/'.join(f'{x / 1e9:.1f}' + ('' if x <= ram else '!') for x in need[p]):>15}"
                         for p in PRECISIONS)
        lines.append(f"{dev:<15} {cells}   ({ram / 1e9:.0f} GB; '!' does not fit)")
    w = Workload(text=text, visual=visual, gen=gen, steps=gen)
    lines += ["", f"compute floor per denoising step ({text} text + {visual} visual + {gen} response tokens; seconds "
                  "at dense peak; int8: the decoder linears at INT8 peak, attention and the LM head at FP16's)",
              f"{'device':<15} {'unpruned fp16':>13} {'int8':>6} {'K15P50 later fp16':>18} {'int8':>6}"]
    for dev, peak in {**ORIN, **NANO}.items():
        cells = [floor(w, k, p, peak, prec) for p in (0, 50) for prec in ("fp16", "int8")]
        lines.append(f"{dev:<15} {cells[0]:>13.2f} {cells[1]:>6.2f} {cells[2]:>18.2f} {cells[3]:>6.2f}")
    return "\n".join(lines)


NANO = {"Orin Nano 8GB": {"fp16": 16.75e12, "int8": 33.5e12}}  # derived like ORIN: 67 sparse INT8 TOPS / 2, / 4


def main(argv=None) -> int:
    from export.model import PRESETS
    from export.profiles import ProfileSettings, axis_ranges
    from runtime.cli_args import image_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--max-image", type=image_size, metavar="WIDTHxHEIGHT",
                    help="the profile's largest frame, as export/build_engines.py --max-image (default: any image)")
    ap.add_argument("--max-text-tokens", type=int, default=256, help="the profile's longest prompt")
    ap.add_argument("--max-response", type=int, default=128, help="the profile's longest response")
    ap.add_argument("--cameras", type=int, default=1,
                    help="a camera rig: engines sized for this many views per request (export/build_engines.py "
                         "--cameras, one-image layout single), and the step floors at that many views")
    ap.add_argument("--visual", type=int, default=None,
                    help="visual tokens of the step floors (default: 3649, one 1920x1080 AnyRes frame; a rig: 730 "
                         "per camera)")
    ap.add_argument("--text", type=int, default=50)
    ap.add_argument("--gen-length", type=int, default=64)
    args = ap.parse_args(argv)
    cfg = PRESETS["llada-v-8b"]
    default = ProfileSettings()
    profile = replace(default, max_text_tokens=args.max_text_tokens, max_response=args.max_response,
                      opt_text_tokens=min(default.opt_text_tokens, args.max_text_tokens),
                      opt_response=min(default.opt_response, args.max_response), max_image=args.max_image,
                      cameras=args.cameras, layout="single" if args.cameras > 1 else default.layout)
    ranges = axis_ranges(cfg, profile.validate(), 0)
    visual = args.visual if args.visual is not None else 3649 if args.cameras == 1 else args.cameras * 730
    print(report(args.k, ranges["seq"][2], ranges["tiles"][2], visual, args.text, args.gen_length))
    if args.cameras > 1:  # the rig's answer time, as bench.cache projects the one-frame answer
        from bench.cache import orin_projection

        print("\n" + orin_projection(visual=visual, text=args.text, gen=args.gen_length, k=args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
