"""Random LLaDA-V checkpoints in the real layout: the `tiny` model, a family of shapes, the 8B's widths.

    python -m export.tiny                                   # writes tiny if needed, prints its directory
    python -m export.tiny --preset llada-v-8b --layers 4    # the 8B's real widths, 4 decoder layers
    python -m export.tiny --preset family-real-vocab --out DIR

The embedded default is the trained miniature (miniature/); the tiny model stays for what needs
the real 384/14 token counts (tests, benchmarks at real sequence lengths). Seeded random weights of the `tiny` preset (32 decoder layers, real 384/14 tile geometry) in
bf16 shards with an index, and a small byte-level BPE tokenizer of its own carrying LLaDA-V's
special tokens (appended after the trained vocabulary, as in the real tokenizer). Writing is
deterministic: the same files every time, so content hashes are stable.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from dataclasses import replace

from export.checkpoint import config_to_json, write_checkpoint
from export.model import PRESETS, DecoderDims, LladaV, ModelConfig, VisionDims
from runtime.anyres import ImageGeometry
from runtime.errors import expect
from runtime.tokens import SPECIAL_TOKENS, SYSTEM_PROMPT

TINY_VERSION = "tiny-v2"  # bump when the written files change
TINY_SEED = 0
TINY_SHARD_BYTES = 1 << 20  # several shards even for the tiny model, like the real checkpoint

# LLaDA-V's special token ids (docs/architecture.md), for checkpoints with the real vocabulary
REAL_SPECIAL_IDS = {"bos": 126080, "eos": 126081, "mask": 126336, "start_header": 126346, "end_header": 126347,
                    "eot": 126348}


def _geometry(side: int, patch: int, max_tiles: int) -> ImageGeometry:
    return ImageGeometry(image_size=side, patch_size=patch, max_tiles=max_tiles,
                         grid_pinpoints=tuple((side * i, side * j) for i in range(1, 4) for j in range(1, 4)))


# Checkpoints of other shapes than ours (tests/test_family.py builds each at every precision): heads,
# head dim, width, depth, RoPE theta, norm eps, vocabulary, special-token ids and the vision tower all
# differ. Small widths and small tiles, so the suite stays short. Values: (config, special-token ids;
# None appends them after the byte-level BPE's 400 tokens, as `tiny` does).
FAMILY = {
    # the case: 20 layers, 6 heads of 16, RoPE theta 10000
    "family-heads6": (ModelConfig(
        DecoderDims(n_layers=20, d_model=96, n_heads=6, d_mlp=256, vocab_size=406, rope_theta=10000.0, rms_eps=1e-6),
        VisionDims(d_model=48, n_layers=2, n_heads=4, d_mlp=96, image_size=128, patch_size=16),
        _geometry(128, 16, 2), name="family-heads6"), None),
    # LLaDA-V's real vocabulary and special-token ids, two heads of 64, a wider vision tower
    "family-real-vocab": (ModelConfig(
        DecoderDims(n_layers=6, d_model=128, n_heads=2, d_mlp=352, vocab_size=126464),
        VisionDims(d_model=80, n_layers=2, n_heads=2, d_mlp=160, image_size=192, patch_size=16, ln_eps=1e-5),
        _geometry(192, 16, 2), name="family-real-vocab"), REAL_SPECIAL_IDS),
    # narrow heads (8 of 6), RoPE theta 1e6, special tokens at ids of our choosing inside a padded vocab
    "family-narrow": (ModelConfig(
        DecoderDims(n_layers=12, d_model=48, n_heads=8, d_mlp=128, vocab_size=1000, rope_theta=1e6, rms_eps=1e-6),
        VisionDims(d_model=64, n_layers=1, n_heads=4, d_mlp=128, image_size=128, patch_size=16),
        _geometry(128, 16, 2), name="family-narrow"),
        {"bos": 900, "eos": 901, "mask": 950, "start_header": 960, "end_header": 961, "eot": 962}),
}

CORPUS = [
    SYSTEM_PROMPT,
    "What is in the image? Describe the scene in detail.",
    "Is there a car, a truck, a bus, a bicycle or a pedestrian in front of the vehicle?",
    "What color is the traffic light? Is the road wet? How many lanes are there?",
    "The pedestrian is crossing the street. The car ahead is braking. The light is red.",
    "Answer the question using a single word or phrase. Yes. No. Left. Right. Stop. Go.",
    "a chart with numbers 0 1 2 3 4 5 6 7 8 9 and a title, a sign that says speed limit 50",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def default_home() -> Path:
    return Path(os.environ.get("LLADAV_EDGE_HOME", Path.home() / ".cache" / "lladav-edge"))


def default_model_dir() -> Path:
    return default_home() / TINY_VERSION


def build_tokenizer(vocab_size: int = 400, corpus=tuple(CORPUS)):
    """A byte-level BPE trained on `corpus`, LLaDA-V's special tokens appended after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tok


def tokenizer_files(tok) -> dict[str, str]:
    ids = {name: tok.token_to_id(text) for name, text in SPECIAL_TOKENS.items()}
    added = {
        str(ids[name]): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
        for name, text in SPECIAL_TOKENS.items()
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["eos"],
        "additional_special_tokens": [SPECIAL_TOKENS["mask"]],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 16384,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["eos"],
        "additional_special_tokens": [SPECIAL_TOKENS["mask"]],
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }, ids


def place_special_tokens(tok, ids: dict[str, int], vocab_size: int):
    """`tok` (its BPE vocabulary, the special tokens appended) re-laid so the special tokens sit at `ids`
    and the vocabulary has `vocab_size` entries: the ids between are unreachable `<|reserved_i|>`
    tokens, as the real tokenizer's reserved range is."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    at = {ids[name]: text for name, text in SPECIAL_TOKENS.items()}
    expect(set(ids) == set(SPECIAL_TOKENS) and len(at) == len(ids) and min(at) >= len(vocab) and max(at) < vocab_size,
           f"special token ids: got {ids}; expected one distinct id per special token in [{len(vocab)}, {vocab_size})")
    for i in range(len(vocab), vocab_size):
        vocab[at.get(i, f"<|reserved_{i}|>")] = i
    by_text = {text: name for name, text in SPECIAL_TOKENS.items()}
    data["added_tokens"] = [{**a, "id": ids[by_text[a["content"]]]} for a in data["added_tokens"]]
    return Tokenizer.from_str(json.dumps(data))


def random_state(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights scaled to keep activations near unit size through 32 layers; each tensor drawn in
    float32 and cast to `dtype` at once (an 8B-width state never exists in float32 as a whole)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        shapes = LladaV(cfg).state_dict()
    for key, t in shapes.items():
        if key.endswith("bias"):
            value = torch.zeros(t.shape)
        elif t.dim() == 1 and ("norm" in key or "layer_norm" in key):
            value = torch.ones(t.shape)
        else:
            fan_in = math.prod(t.shape[1:]) if t.dim() > 1 and "embed" not in key else 1
            value = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
            if key == "lm_head.weight":
                value[:256] = 0.0  # byte tokens score 0: the noise decodes to word pieces
        state[key] = value.to(dtype)
    return state


def write_random(path, cfg: ModelConfig, special_ids: dict[str, int] | None = None, seed: int = TINY_SEED,
                 max_shard_bytes: int | None = TINY_SHARD_BYTES) -> Path:
    """A random checkpoint of `cfg` in the real layout at `path` (atomically), bf16 shards with an index
    and a tokenizer whose special tokens sit at `special_ids` (None: right after the BPE's tokens)."""
    tok = build_tokenizer()
    if special_ids is not None:
        tok = place_special_tokens(tok, special_ids, cfg.decoder.vocab_size)
    files, ids = tokenizer_files(tok)
    expect(tok.get_vocab_size() == cfg.decoder.vocab_size,
           f"{cfg.name}: the tokenizer has {tok.get_vocab_size()} tokens, the config's vocab {cfg.decoder.vocab_size}")
    state = random_state(cfg, seed, torch.bfloat16)
    return write_checkpoint(path, config_to_json(cfg, ids), state, files, max_shard_bytes)


def write_tiny(path, seed: int = TINY_SEED, max_shard_bytes: int | None = TINY_SHARD_BYTES) -> Path:
    """Write the tiny checkpoint to `path` (atomically)."""
    return write_random(path, PRESETS["tiny"], None, seed, max_shard_bytes)


def preset_config(name: str, layers: int | None = None) -> tuple[ModelConfig, dict | None]:
    """(config, special-token ids) of a named preset or family member, with `layers` decoder layers."""
    if name in FAMILY:
        cfg, ids = FAMILY[name]
    else:
        expect(name in PRESETS and name != "miniature",
               f"preset: got {name!r}; expected one of {sorted(set(PRESETS) - {'miniature'}) + sorted(FAMILY)}")
        cfg = PRESETS[name]
        ids = REAL_SPECIAL_IDS if cfg.decoder.vocab_size == 126464 else None
    if layers is not None:
        expect(layers >= 2, f"layers: got {layers}; expected >= 2 (K splits the decoder)")
        cfg = replace(cfg, decoder=replace(cfg.decoder, n_layers=layers),
                      name=cfg.name if layers == cfg.n_layers else f"{cfg.name}-{layers}l")
    return cfg, ids


def ensure_tiny(path=None) -> Path:
    """The tiny model's directory, written first if it is not there yet."""
    path = Path(path) if path is not None else default_model_dir()
    if not (path / "config.json").is_file():
        write_tiny(path)
    return path


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(prog="python -m export.tiny", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="tiny", help=f"tiny, llada-v-8b (real widths, SigLIP so400m, the real "
                                                     f"vocabulary and special-token ids) or one of {sorted(FAMILY)}")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--out", default=None, help="checkpoint directory (default: under $LLADAV_EDGE_HOME or "
                                                "~/.cache/lladav-edge, named by preset and layers)")
    ap.add_argument("--seed", type=int, default=TINY_SEED, help="random seed of the weights")
    return ap


def main(argv=None) -> int:
    from runtime.errors import LladaVError
    from runtime.files import check_output_dir

    args = build_parser().parse_args(argv)
    try:
        if args.preset == "tiny" and args.layers is None and args.seed == TINY_SEED:
            cfg, ids, out = PRESETS["tiny"], None, Path(args.out) if args.out else default_model_dir()
        else:
            cfg, ids = preset_config(args.preset, args.layers)
            out = Path(args.out) if args.out else default_home() / f"{cfg.name}-seed{args.seed}"
        if not (out / "config.json").is_file():
            check_output_dir(out, "--out" if args.out else "LLADAV_EDGE_HOME (or ~/.cache/lladav-edge)")
            expect(not out.is_dir() or not any(out.iterdir()),
                   f"--out {str(out)!r}: exists and holds no checkpoint; expected a new or empty directory")
            shard = 1 << 30 if cfg.decoder.d_model >= 1024 else TINY_SHARD_BYTES
            write_random(out, cfg, ids, args.seed, max_shard_bytes=shard)
    except LladaVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a failure after the checks (disk full): nothing half-written is left (atomic)
        print(f"error: writing the checkpoint to {str(out)!r} failed ({exc})", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
