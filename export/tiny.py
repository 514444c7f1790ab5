"""The random `tiny` model: an LLaDA-V checkpoint in the real layout, written on demand.

    python -m export.tiny        # writes it if needed and prints its directory

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
from pathlib import Path

import torch

from export.checkpoint import config_to_json, write_checkpoint
from export.model import PRESETS, LladaV, ModelConfig
from runtime.tokens import SPECIAL_TOKENS, SYSTEM_PROMPT

TINY_VERSION = "tiny-v2"  # bump when the written files change
TINY_SEED = 0
TINY_SHARD_BYTES = 1 << 20  # several shards even for the tiny model, like the real checkpoint

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


def random_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights scaled to keep activations near unit size through 32 layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        shapes = LladaV(cfg).state_dict()
    for key, t in shapes.items():
        if key.endswith("bias"):
            state[key] = torch.zeros(t.shape)
        elif t.dim() == 1 and ("norm" in key or "layer_norm" in key):
            state[key] = torch.ones(t.shape)
        else:
            fan_in = math.prod(t.shape[1:]) if t.dim() > 1 and "embed" not in key else 1
            state[key] = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
    state["lm_head.weight"][:256] = 0.0  # byte tokens score 0: the noise decodes to word pieces
    return state


def write_tiny(path, seed: int = TINY_SEED, max_shard_bytes: int | None = TINY_SHARD_BYTES) -> Path:
    """Write the tiny checkpoint to `path` (atomically)."""
    tok = build_tokenizer()
    files, ids = tokenizer_files(tok)
    cfg = PRESETS["tiny"]
    assert tok.get_vocab_size() == cfg.decoder.vocab_size, "the tiny tokenizer and the tiny vocab disagree"
    state = {k: v.to(torch.bfloat16) for k, v in random_state(cfg, seed).items()}
    return write_checkpoint(path, config_to_json(cfg, ids), state, files, max_shard_bytes)


def ensure_tiny(path=None) -> Path:
    """The tiny model's directory, written first if it is not there yet."""
    path = Path(path) if path is not None else default_model_dir()
    if not (path / "config.json").is_file():
        write_tiny(path)
    return path


def main() -> int:
    print(ensure_tiny())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
