"""Checkpoint I/O in the real LLaDA-V layout: round trips and every kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.checkpoint import INDEX, SO400M, load_model, open_checkpoint, parse_config, write_checkpoint
from export.model import PRESETS
from export.tiny import write_tiny
from runtime.errors import LladaVError
from runtime.tokens import SPECIAL_TOKENS, TextTokenizer


def copy_ckpt(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def index_of(path):
    return json.loads((path / INDEX).read_text())


def edit_shard(path, shard, fn):
    tensors = load_file(str(path / shard))
    fn(tensors)
    save_file(tensors, str(path / shard), metadata={"format": "pt"})


def test_tiny_is_sharded_in_the_real_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    weight_map = index_of(tiny_dir)["weight_map"]
    assert set(weight_map.values()) == set(shards)
    for key in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.31.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.post_attention_layernorm.weight", "model.mm_projector.2.weight",
                "model.image_newline",
                "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight"]:
        assert key in weight_map, key


def test_round_trip_loads_exactly_what_was_written(tiny_dir, tiny):
    model, ckpt = tiny
    assert ckpt.config == parse_config(json.loads((tiny_dir / "config.json").read_text()), tiny_dir)
    assert ckpt.config.decoder == PRESETS["tiny"].decoder and ckpt.config.vision == PRESETS["tiny"].vision
    state = model.state_dict()
    written = {}
    for shard in set(index_of(tiny_dir)["weight_map"].values()):
        written.update(load_file(str(tiny_dir / shard)))
    assert set(written) == set(state)
    for key, value in written.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(state[key], value.float()), key  # bf16 -> f32 is exact


def test_single_file_round_trip_and_bf16_load(tmp_path, tiny):
    model, ckpt = tiny
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    files = {n: (ckpt.path / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    path = write_checkpoint(tmp_path / "single", ckpt.raw_config, state, files, max_shard_bytes=None)
    assert (path / "model.safetensors").is_file() and not (path / INDEX).exists()
    loaded, _ = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for key, value in loaded.state_dict().items():
        assert not value.is_meta, key
        if key in state:
            assert torch.equal(value, state[key]), key


def test_writer_is_deterministic(tmp_path, tiny):
    _, ckpt = tiny
    again = open_checkpoint(write_tiny(tmp_path / "again"))
    assert again.content_hash() == ckpt.content_hash()


def test_token_ids_come_from_the_files(tiny_dir, tokenizer):
    decoded = json.loads((tiny_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    by_text = {v["content"]: int(k) for k, v in decoded.items()}
    for name, text in SPECIAL_TOKENS.items():
        assert getattr(tokenizer.ids, name) == by_text[text]
    assert tokenizer.ids.mask != 126336  # the tiny vocabulary is small: nothing may be hard-coded


def test_dropped_vision_layer_and_head_are_accepted(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    index = index_of(path)
    shard = index["weight_map"]["lm_head.weight"]
    extra = {
        "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(64, 32),
        "model.vision_tower.vision_tower.vision_model.head.probe": torch.zeros(1, 1, 32),
    }
    edit_shard(path, shard, lambda t: t.update(extra))
    index["weight_map"].update({k: shard for k in extra})
    (path / INDEX).write_text(json.dumps(index))
    model, _ = load_model(path)
    assert len(model.model.vision_tower.vision_tower.vision_model.encoder.layers) == 2


def test_real_config_without_vision_config_names_so400m(tiny_dir):
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw.pop("vision_config")
    raw["mm_vision_tower"] = "google/siglip2-so400m-patch14-384"
    raw["mm_hidden_size"] = SO400M["hidden_size"]
    cfg = parse_config(raw, tiny_dir / "config.json")
    assert cfg.vision.d_model == SO400M["hidden_size"] and cfg.vision.n_layers == 26
    raw["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    with pytest.raises(LladaVError, match="mm_vision_tower"):
        parse_config(raw, tiny_dir / "config.json")


def break_missing_shard(path):
    shard = index_of(path)["weight_map"]["lm_head.weight"]
    (path / shard).unlink()
    return rf"missing shard '{shard}'"


def break_missing_key(path):
    index = index_of(path)
    shard = index["weight_map"].pop("model.layers.7.mlp.up_proj.weight")
    edit_shard(path, shard, lambda t: t.pop("model.layers.7.mlp.up_proj.weight"))
    (path / INDEX).write_text(json.dumps(index))
    return r"missing key.*model\.layers\.7\.mlp\.up_proj\.weight"


def break_unexpected_key(path):
    index = index_of(path)
    shard = index["weight_map"]["lm_head.weight"]
    edit_shard(path, shard, lambda t: t.update({"model.layers.40.mlp.up_proj.weight": torch.zeros(2)}))
    index["weight_map"]["model.layers.40.mlp.up_proj.weight"] = shard
    (path / INDEX).write_text(json.dumps(index))
    return r"unexpected key.*model\.layers\.40\.mlp\.up_proj\.weight"


def break_shape(path):
    shard = index_of(path)["weight_map"]["model.norm.weight"]
    edit_shard(path, shard, lambda t: t.update({"model.norm.weight": torch.ones(63, dtype=torch.bfloat16)}))
    return r"'model\.norm\.weight'.*shape \(63,\); expected \(64,\)"


def break_dtype(path):
    shard = index_of(path)["weight_map"]["model.norm.weight"]
    edit_shard(path, shard, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    return r"'model\.norm\.weight'.*dtype I32"


def break_index_lies(path):
    index = index_of(path)
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][key] = shards[1]
    (path / INDEX).write_text(json.dumps(index))
    return rf"'{key}' is not in it"


def break_config_json(path):
    (path / "config.json").write_text("{ not json")
    return r"config\.json.*not valid JSON"


def break_config_key(path):
    raw = json.loads((path / "config.json").read_text())
    raw["hidden_size"] = "64"
    (path / "config.json").write_text(json.dumps(raw))
    return r"'hidden_size' is '64'; expected a int"


def break_gqa(path):
    raw = json.loads((path / "config.json").read_text())
    raw["num_key_value_heads"] = 2
    (path / "config.json").write_text(json.dumps(raw))
    return r"num_key_value_heads is 2"


def break_truncated_shard(path):
    shard = index_of(path)["weight_map"]["lm_head.weight"]
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[:40])
    return rf"{shard}.*unreadable safetensors"


def break_tokenizer(path):
    (path / "tokenizer.json").unlink()
    return r"tokenizer\.json' is missing"


def test_float16_overflow_is_named(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    shard = index_of(path)["weight_map"]["model.norm.weight"]
    big = torch.ones(64, dtype=torch.bfloat16)
    big[3] = 1e6  # fine in bfloat16, inf in float16
    edit_shard(path, shard, lambda t: t.update({"model.norm.weight": big}))
    load_model(path, torch.float32)
    with pytest.raises(LladaVError, match=r"'model\.norm\.weight'.*beyond float16's range"):
        load_model(path, torch.float16)


@pytest.mark.parametrize(
    "breaker",
    [break_missing_shard, break_missing_key, break_unexpected_key, break_shape, break_dtype, break_index_lies,
     break_config_json, break_config_key, break_gqa, break_truncated_shard],
)
def test_bad_checkpoint_is_a_clear_error(tmp_path, tiny_dir, breaker):
    path = copy_ckpt(tiny_dir, tmp_path)
    pattern = breaker(path)
    with pytest.raises(LladaVError, match=pattern):
        load_model(path)


def test_missing_tokenizer_is_a_clear_error(tmp_path, tiny_dir):
    path = copy_ckpt(tiny_dir, tmp_path)
    pattern = break_tokenizer(path)
    with pytest.raises(LladaVError, match=pattern):
        TextTokenizer(path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(LladaVError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LladaVError, match=r"config\.json' is missing"):
        load_model(tmp_path / "empty")


def test_interrupted_write_leaves_nothing(tmp_path, tiny):
    model, ckpt = tiny
    state = dict(model.state_dict())
    state["bad"] = object()  # fails mid-write
    with pytest.raises(Exception):
        write_checkpoint(tmp_path / "out", ckpt.raw_config, state, {}, max_shard_bytes=1 << 16)
    assert list(tmp_path.iterdir()) == []


def test_the_checkpoint_writer_names_a_bad_home_before_writing(tmp_path, monkeypatch, capsys):
    """LLADAV_EDGE_HOME a file, or --out holding other files: exit 2 with the reason (a traceback before)."""
    from export.tiny import main as tiny_main

    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("LLADAV_EDGE_HOME", str(home))
    assert tiny_main([]) == 2
    assert "LLADAV_EDGE_HOME (or ~/.cache/lladav-edge)" in capsys.readouterr().err and home.read_text() == "not a directory"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert tiny_main(["--preset", "family-narrow", "--out", str(busy)]) == 2
    assert "exists and holds no checkpoint" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"
    assert tiny_main(["--preset", "family-narrow", "--layers", "2", "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "config.json").is_file()
