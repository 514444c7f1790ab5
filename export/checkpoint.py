"""Read and write LLaDA-V checkpoints in the Hugging Face layout.

A checkpoint directory holds `config.json` (LLaMA-style keys plus LLaDA-V's `mm_*` keys),
`model.safetensors` or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, and the tokenizer files (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`).

Loading streams tensor by tensor into a model built on the meta device, casting each to the
target dtype as it arrives: peak memory is the model in that dtype plus one tensor, so an 8B
checkpoint loads in bf16 within about its own size of RAM.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from export.model import DecoderDims, LladaV, ModelConfig, VisionDims
from runtime.anyres import ImageGeometry, parse_grid_pinpoints, parse_max_tiles
from runtime.errors import LladaVError, expect
from runtime.files import atomic_directory, read_json, write_json

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

# SigLIP so400m-patch14-384, the tower LLaDA-V names in mm_vision_tower (27 layers in the file).
SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk, validated: where it is, its config and where each tensor lives."""

    path: Path
    config: ModelConfig
    raw_config: dict
    weight_map: dict  # key -> shard file name

    def content_hash(self) -> str:
        """sha256 over config, index and shard bytes: the identity of these weights."""
        h = hashlib.sha256()
        for name in [CONFIG, *sorted(set(self.weight_map.values()))]:
            h.update(name.encode())
            with open(self.path / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest()


# ---------------------------------------------------------------- config.json


def _require(raw: dict, key: str, kind, path: Path):
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise LladaVError(f"config {str(path)!r}: key {key!r} is {value!r}; expected a {expected}")
    return value


def _check_equal(raw: dict, key: str, expected, path: Path, default=None):
    got = raw.get(key, default)
    expect(got == expected, f"config {str(path)!r}: {key} is {got!r}; this pipeline supports {expected!r}")


def parse_config(raw: dict, path: Path) -> ModelConfig:
    """config.json (LLaMA keys + mm_* keys) -> ModelConfig, refusing what we do not implement."""
    num = (int, float)
    heads = _require(raw, "num_attention_heads", int, path)
    _check_equal(raw, "num_key_value_heads", heads, path, default=heads)
    _check_equal(raw, "attention_bias", False, path, default=False)
    _check_equal(raw, "hidden_act", "silu", path, default="silu")
    _check_equal(raw, "tie_word_embeddings", False, path, default=False)
    _check_equal(raw, "mm_projector_type", "mlp2x_gelu", path)
    _check_equal(raw, "mm_vision_select_layer", -2, path)
    _check_equal(raw, "mm_patch_merge_type", "spatial_unpad", path)
    decoder = DecoderDims(
        n_layers=_require(raw, "num_hidden_layers", int, path),
        d_model=_require(raw, "hidden_size", int, path),
        n_heads=heads,
        d_mlp=_require(raw, "intermediate_size", int, path),
        vocab_size=_require(raw, "vocab_size", int, path),
        rope_theta=float(_require(raw, "rope_theta", num, path)),
        rms_eps=float(_require(raw, "rms_norm_eps", num, path)),
        max_positions=int(raw.get("max_position_embeddings", 16384)),
    )
    expect(decoder.d_model % heads == 0, f"config {str(path)!r}: hidden_size {decoder.d_model} is not divisible by {heads} heads")
    expect(decoder.n_layers >= 2, f"config {str(path)!r}: num_hidden_layers is {decoder.n_layers}; expected >= 2")
    vision = _vision_dims(raw, path)
    mm_hidden = raw.get("mm_hidden_size", vision.d_model)
    expect(mm_hidden == vision.d_model, f"config {str(path)!r}: mm_hidden_size {mm_hidden} != vision hidden_size {vision.d_model}")
    geometry = ImageGeometry(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        grid_pinpoints=parse_grid_pinpoints(raw.get("image_grid_pinpoints", "(1x1),...,(6x6)"), vision.image_size),
        max_tiles=parse_max_tiles(raw.get("image_aspect_ratio", "")),
    )
    # the config's own name, else the checkpoint directory's (path is its config.json)
    name = raw.get("_name_or_path") or (path.parent.name if path.name == CONFIG else path.name)
    return ModelConfig(decoder, vision, geometry, name=str(name))


def _vision_dims(raw: dict, path: Path) -> VisionDims:
    """The vision config in the file, or the so400m shape a real checkpoint names."""
    vc = raw.get("vision_config")
    if vc is None:
        tower = str(raw.get("mm_vision_tower", ""))
        expect(
            "so400m" in tower and "patch14-384" in tower,
            f"config {str(path)!r}: no vision_config and mm_vision_tower is {tower!r}; "
            "expected a vision_config or a siglip so400m-patch14-384 tower",
        )
        vc = SO400M
    vpath = Path(f"{path}:vision_config")
    return VisionDims(
        d_model=_require(vc, "hidden_size", int, vpath),
        n_layers=_require(vc, "num_hidden_layers", int, vpath) - 1,  # mm_vision_select_layer = -2
        n_heads=_require(vc, "num_attention_heads", int, vpath),
        d_mlp=_require(vc, "intermediate_size", int, vpath),
        image_size=_require(vc, "image_size", int, vpath),
        patch_size=_require(vc, "patch_size", int, vpath),
        ln_eps=float(vc.get("layer_norm_eps", 1e-6)),
        act=str(vc.get("hidden_act", "gelu_pytorch_tanh")),
    )


def vision_tower_name(cfg: ModelConfig) -> str:
    """The real model names Google's tower; our small ones name their own shape."""
    if cfg.name == "llada-v-8b":
        return "google/siglip-so400m-patch14-384"
    return f"siglip-{cfg.name}-patch{cfg.vision.patch_size}-{cfg.vision.image_size}"


def config_to_json(cfg: ModelConfig, token_ids: dict, torch_dtype: str = "bfloat16") -> dict:
    """ModelConfig -> config.json in LLaDA-V's layout (with an explicit vision_config)."""
    d, v, g = cfg.decoder, cfg.vision, cfg.geometry
    return {
        "architectures": ["LlavaLLaDAModelLM"],
        "model_type": "llava_llada",
        "_name_or_path": cfg.name,
        "hidden_size": d.d_model,
        "intermediate_size": d.d_mlp,
        "num_hidden_layers": d.n_layers,
        "num_attention_heads": d.n_heads,
        "num_key_value_heads": d.n_heads,
        "vocab_size": d.vocab_size,
        "rope_theta": d.rope_theta,
        "rms_norm_eps": d.rms_eps,
        "max_position_embeddings": d.max_positions,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["eos"],
        "mm_vision_tower": vision_tower_name(cfg),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": v.d_model,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "grid",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": f"anyres_max_{g.max_tiles}",
        "image_grid_pinpoints": [list(p) for p in g.grid_pinpoints],
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": v.d_model,
            "intermediate_size": v.d_mlp,
            "num_hidden_layers": v.n_layers + 1,
            "num_attention_heads": v.n_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": v.act,
            "layer_norm_eps": v.ln_eps,
        },
    }


# ---------------------------------------------------------------- reading


def open_checkpoint(path) -> Checkpoint:
    """Validate the directory's files (not yet the tensors) and parse its config."""
    path = Path(path)
    expect(path.is_dir(), f"checkpoint {str(path)!r}: not a directory; expected an LLaDA-V checkpoint directory")
    raw = read_json(path / CONFIG, "checkpoint config")
    cfg = parse_config(raw, path / CONFIG)
    if (path / INDEX).exists():
        index = read_json(path / INDEX, "checkpoint index")
        weight_map = index.get("weight_map")
        expect(isinstance(weight_map, dict) and weight_map, f"checkpoint index {str(path / INDEX)!r}: no weight_map")
    else:
        expect((path / SINGLE_FILE).is_file(), f"checkpoint {str(path)!r}: neither {INDEX} nor {SINGLE_FILE} is present")
        weight_map = {k: SINGLE_FILE for k in _shard_keys(path / SINGLE_FILE)}
    for shard in sorted(set(weight_map.values())):
        expect((path / shard).is_file(), f"checkpoint {str(path)!r}: missing shard {shard!r} (named in {INDEX})")
    return Checkpoint(path, cfg, raw, dict(weight_map))


def _shard_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise LladaVError(f"checkpoint shard {str(file)!r}: unreadable safetensors file ({exc})") from None


def ignorable_key(key: str, cfg: ModelConfig) -> bool:
    """Keys a real checkpoint may hold that the model does not use.

    The SigLIP layer dropped by mm_vision_select_layer=-2 and SigLIP's pooling head.
    """
    dropped = f"{VISION_PREFIX}encoder.layers.{cfg.vision.n_layers}."
    return key.startswith(dropped) or key.startswith(f"{VISION_PREFIX}head.")


def check_keys(ckpt: Checkpoint, expected: dict) -> None:
    present = set(ckpt.weight_map)
    missing = sorted(set(expected) - present)
    unexpected = sorted(k for k in present - set(expected) if not ignorable_key(k, ckpt.config))
    if missing:
        raise LladaVError(f"checkpoint {str(ckpt.path)!r}: {len(missing)} missing key(s), first {missing[:5]}")
    if unexpected:
        raise LladaVError(f"checkpoint {str(ckpt.path)!r}: {len(unexpected)} unexpected key(s), first {unexpected[:5]}")


def load_model(path, dtype: torch.dtype = torch.float32) -> tuple[LladaV, Checkpoint]:
    """Load a checkpoint into an eval-mode LladaV of `dtype`, streaming one tensor at a time."""
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = LladaV(ckpt.config)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    check_keys(ckpt, expected)
    by_shard: dict[str, list[str]] = {}
    for key, shard in ckpt.weight_map.items():
        if key in expected:
            by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        _load_shard(model, ckpt.path / shard, keys, expected, dtype)
    _materialize_buffers(model)
    return model.eval().requires_grad_(False), ckpt


def _load_shard(model: nn.Module, file: Path, keys: list[str], expected: dict, dtype: torch.dtype) -> None:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:
        raise LladaVError(f"checkpoint shard {str(file)!r}: unreadable safetensors file ({exc})") from None
    with handle as f:
        present = set(f.keys())
        for key in keys:
            expect(key in present, f"checkpoint shard {str(file)!r}: key {key!r} is not in it, though the index says so")
            info = f.get_slice(key)
            got_dtype, shape = info.get_dtype(), tuple(info.get_shape())
            expect(
                got_dtype in FLOAT_DTYPES,
                f"checkpoint {key!r} in {file.name}: dtype {got_dtype}; expected one of {sorted(FLOAT_DTYPES)}",
            )
            expect(shape == expected[key], f"checkpoint {key!r} in {file.name}: shape {shape}; expected {expected[key]}")
            value = f.get_tensor(key)
            cast = value.to(dtype)
            if dtype == torch.float16 and value.dtype != torch.float16:
                expect(bool(torch.isfinite(cast).all()) or not bool(torch.isfinite(value).all()),
                       f"checkpoint {key!r} in {file.name}: values beyond float16's range (max |x| "
                       f"{value.abs().max().item():.3g} > 65504); load it in bfloat16 or float32")
            _set_tensor(model, key, cast)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[name] = nn.Parameter(value, requires_grad=False)


def _materialize_buffers(model: LladaV) -> None:
    """Recreate non-persistent buffers (not in checkpoints) that meta construction left empty."""
    emb = model.model.vision_tower.vision_tower.vision_model.embeddings
    n = emb.position_embedding.weight.shape[0]
    emb.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors never loaded: {left[:5]}"


# ---------------------------------------------------------------- writing


def write_checkpoint(path, cfg_json: dict, state: dict, tokenizer_files: dict, max_shard_bytes: int | None = None) -> Path:
    """Write a checkpoint directory atomically: sharded with an index when max_shard_bytes is set."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_directory(path) as tmp:
        write_json(tmp / CONFIG, cfg_json)
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        shards = _split(state, max_shard_bytes)
        if max_shard_bytes is None:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
                total += sum(t.numel() * t.element_size() for t in shard.values())
            write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return path


def _split(state: dict, max_bytes: int | None) -> list[dict]:
    """Greedy sharding in key order; each tensor is contiguous and owns its storage."""
    shards, current, size = [], {}, 0
    for key in sorted(state, key=_natural):
        t = state[key].detach().contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if current and max_bytes is not None and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = t, size + nbytes
    shards.append(current)
    return shards


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]
