"""build_engines: profiles, trtexec commands, the manifest, reuse, atomicity and bad arguments."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

from export import build as build_mod
from export.build import BuildRequest, build_bundle, summary
from export.build_engines import main
from export.model import PRESETS
from export.engine_config import EngineBuildSettings, build_script, trtexec_command
from export.profiles import ProfileSettings, axis_ranges, input_shapes, profile_ranges, settings_dict, validation_axes
from export.subgraphs import DECODER_PRE, SUBGRAPHS, VISION, dummy_inputs
from runtime.bundle import Manifest, read_manifest, sha256_file, verify_files
from runtime.caching import cache_window
from runtime.errors import LladaVError

REAL = PRESETS["llada-v-8b"]
QUICK = ProfileSettings(layout="single", max_text_tokens=160, opt_text_tokens=100, max_response=32, opt_response=16)


def quiet(_msg):
    pass


def test_profile_ranges_cover_full_and_reduced_sequences():
    s = ProfileSettings()  # anyres, 256/96 text, 128/32 response, tuned for 1920x1080
    r = axis_ranges(REAL, s, 50)
    assert r["seq"] == (1, 96 + 3649 - 1824 + 32, 256 + 4374 + 128)  # opt: the reduced 1920x1080 sequence
    assert r["tiles"] == (1, 16, 37) and r["batch"] == (1, 1, 1)
    assert r["query"] == (1, 32, 384) and r["rows"] == (1, 32, 128)
    assert r["past"] == (0, 0, 0)  # no cached rows: cached steps run the cached profile
    camera = axis_ranges(REAL, replace(s, max_image=(1920, 1080)), 50)  # sized for the camera frame
    assert camera["tiles"] == (1, 16, 16) and camera["seq"] == (1, r["seq"][1], 256 + 3649 + 128)
    assert ProfileSettings.from_dict(settings_dict(replace(s, max_image=(1920, 1080)))) == replace(s, max_image=(1920, 1080))
    with pytest.raises(LladaVError, match="opt_image 1920x1080: 3649 visual tokens in 16 tiles; max_image 640x480 "
                                          "allows 2929 in 5"):
        axis_ranges(REAL, replace(s, max_image=(640, 480)), 50)
    single = axis_ranges(REAL, replace(s, layout="single", max_batch=2), 70)
    assert single["tiles"] == (1, 1, 1) and single["batch"] == (1, 1, 2)
    assert single["seq"] == (1, 96 + 729 - 510 + 32, 256 + 729 + 128)


def test_the_cached_profile_covers_every_cached_step():
    """A cached step computes a window of the response (dual: one block; prefix: a block and what follows,
    up to the whole response) against the other rows of the reduced sequence; one score row."""
    s = ProfileSettings()
    full, cached = profile_ranges(REAL, s, 50)
    reduced_opt = 96 + 3649 - 1824 + 32
    assert cached["seq"] == (1, 32, 128) and cached["rows"] == (1, 32, 128) and cached["query"] == (1, 1, 1)
    assert cached["past"] == (1, reduced_opt - 32, full["seq"][2])  # tuned at one block against the rest
    assert cached["batch"] == full["batch"]
    for n in (40, reduced_opt, full["seq"][2]):  # any reduced sequence the full profile admits
        for g, block in ((32, 32), (128, 32), (128, 128), (8, 1)):
            if g >= n:
                continue
            for mode in ("prefix", "dual"):
                for start in range(0, g, block):
                    w = cache_window(mode, n, g, (start, min(start + block, g)))
                    assert cached["seq"][0] <= w.compute.size <= cached["seq"][2]
                    assert cached["past"][0] <= w.past.size <= cached["past"][2]
    assert profile_ranges(REAL, replace(s, max_response=16), 50)[1]["seq"] == (1, 16, 16)  # a block fits the response
    with pytest.raises(LladaVError, match="opt_block=0, max_response=128: expected 1 <= opt_block <= max_response"):
        replace(s, opt_block=0).validate()
    assert replace(s, max_response=16, opt_response=8).validate().block_rows == 16  # not given: capped at the response


def test_input_shapes_and_trtexec_command():
    r = axis_ranges(REAL, ProfileSettings(layout="single"), 50)
    shapes = input_shapes(DECODER_PRE, REAL, [r], k=15)[0]
    reduced = 96 + 729 - 729 * 50 // 100 + 32
    assert shapes["inputs_embeds"] == {"min": [1, 1, 4096], "opt": [1, reduced, 4096], "max": [1, 1113, 4096]}
    # K/V of layers 0..14: no cached rows in the full profile
    assert shapes["past_keys"] == {"min": [15, 1, 32, 0, 128], "opt": [15, 1, 32, 0, 128], "max": [15, 1, 32, 0, 128]}
    both = input_shapes(DECODER_PRE, REAL, profile_ranges(REAL, ProfileSettings(layout="single"), 50), k=15)
    assert both[0] == shapes and len(both) == 2
    assert both[1]["inputs_embeds"] == {"min": [1, 1, 4096], "opt": [1, 32, 4096], "max": [1, 128, 4096]}
    assert both[1]["past_keys"] == {"min": [15, 1, 32, 1, 128], "opt": [15, 1, 32, reduced - 32, 128],
                                    "max": [15, 1, 32, 1113, 128]}
    fp16 = EngineBuildSettings("fp16")
    cmd = trtexec_command("onnx/decoder_pre.onnx", "engines/decoder_pre.engine", both, fp16, "engines/t.cache", "trtexec")
    assert cmd[:5] == ["trtexec", "--onnx=onnx/decoder_pre.onnx", "--saveEngine=engines/decoder_pre.engine",
                       "--stronglyTyped", "--noTF32"]
    kv = "past_keys:15x1x32x{0}x128,past_values:15x1x32x{0}x128"
    full = ["--profile=0", "--minShapes=inputs_embeds:1x1x4096,position_ids:1x1,score_rows:1," + kv.format(0),
            f"--optShapes=inputs_embeds:1x{reduced}x4096,position_ids:1x{reduced},score_rows:32," + kv.format(0),
            "--maxShapes=inputs_embeds:1x1113x4096,position_ids:1x1113,score_rows:384," + kv.format(0)]
    cached = ["--profile=1", "--minShapes=inputs_embeds:1x1x4096,position_ids:1x1,score_rows:1," + kv.format(1),
              "--optShapes=inputs_embeds:1x32x4096,position_ids:1x32,score_rows:1," + kv.format(reduced - 32),
              "--maxShapes=inputs_embeds:1x128x4096,position_ids:1x128,score_rows:1," + kv.format(1113)]
    at = cmd.index("--profile=0")
    assert cmd[at : at + 8] == full + cached  # trtexec: each --profile=i followed by its min/opt/max shapes
    assert "--timingCacheFile=engines/t.cache" in cmd and any(a.startswith("--memPoolSize=workspace:") for a in cmd)
    fp32 = trtexec_command("a.onnx", "a.engine", input_shapes(VISION, REAL, [r]), EngineBuildSettings("fp32"), "c", "trtexec")
    assert not any(a.startswith("--profile") for a in fp32)  # one profile: plain min/opt/max shapes
    assert "--stronglyTyped" not in fp32 and "--fp16" not in fp32 and "--noTF32" in fp32
    script = build_script({"vision": trtexec_command("a.onnx", "a.engine", input_shapes(VISION, REAL, [r]),
                                                     EngineBuildSettings("fp32"), "c")}, {"vision": {"onnx_sha256": "ab"}})
    assert '"$TRTEXEC"' in script and "--saveEngine=a.engine.tmp" in script and "mv a.engine.tmp a.engine" in script
    assert "mv a.engine.json.tmp a.engine.json" in script and '"onnx_sha256": "ab"' in script


@pytest.fixture(scope="module")
def bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "b"
    req = BuildRequest(tiny_dir, out, k=15, p=50, precision="fp32", profiles=QUICK)
    return req, build_bundle(req, log=quiet)


def test_bundle_contents_and_manifest(bundle, tiny, tokenizer):
    req, result = bundle
    _, ckpt = tiny
    m = read_manifest(req.out)
    verify_files(req.out, m)
    assert m.k == 15 and m.p == 50 and m.n_layers == 32 and m.precision == "fp32"
    assert m.model["content_hash"] == ckpt.content_hash()
    assert m.token_ids == tokenizer.ids.to_dict()
    assert set(m.subgraphs) == {"vision", "decoder_pre", "decoder_post", "similarity"} and m.rule == "duplicate"
    for spec in SUBGRAPHS:
        e = m.subgraphs[spec.name]
        assert [t.name for t in e.inputs] == spec.input_names and [t.name for t in e.outputs] == spec.output_names
        assert all(set(profile) == set(spec.input_names) for profile in e.shapes) and e.validation
        assert len(e.shapes) == (2 if spec.name.startswith("decoder") else 1)  # full; cached steps (decoders)
    assert m.profiles["axes"]["seq"] == [1, 100 + 729 - 364 + 16, 160 + 729 + 32]
    assert m.versions["torch"] and m.versions["onnx"] and m.versions["onnxruntime"]
    assert m.tensorrt["built"] is False and "TensorRT" in m.tensorrt["reason"]
    script = (req.out / m.tensorrt["script"]).read_text()
    assert script.count("--onnx=") == 4 and "--maxShapes=hidden_states:1x921x64" in script
    assert (req.out / "tokenizer" / "tokenizer.json").is_file() and (req.out / "host" / "embed_tokens.npy").is_file()
    import onnx

    meta = {e.name: {p.key: p.value for p in onnx.load(str(req.out / e.onnx.path), load_external_data=False)
                     .metadata_props} for e in m.subgraphs.values()}
    assert meta["decoder_pre"]["lladav.layers"] == "0-15" and meta["decoder_post"]["lladav.layers"] == "15-32"
    assert meta["decoder_pre"]["lladav.k"] == "15" and meta["vision"]["lladav.k"] == meta["similarity"]["lladav.k"] == "-"
    assert {v["lladav.model_hash"] for v in meta.values()} == {ckpt.content_hash()}
    assert (req.out / "manifest.json.sha256").read_text().split()[0] == sha256_file(req.out / "manifest.json")
    text = summary(result)
    assert "onnx/decoder_pre.onnx" in text and "not built" in text and "build_engines.sh" in text
    assert "size with its .onnx.data" in text
    worst = {n: max((c for d in e.validation.values() for c in d.values()), key=lambda c: c["max_abs_diff"] / c["allowed"])
             for n, e in m.subgraphs.items()}
    for n, c in worst.items():  # every max difference is printed beside the bound it was held to
        assert f"ORT vs model: max |diff| {c['max_abs_diff']:.2e} <= {c['allowed']:.2e} allowed ({c['rule']})" in text
        assert c["max_abs_diff"] <= c["allowed"]


def test_manifest_round_trip(bundle):
    req, _ = bundle
    raw = json.loads((req.out / "manifest.json").read_text())
    assert Manifest.from_dict(raw).to_dict() == raw
    with pytest.raises(LladaVError, match="format_version"):
        Manifest.from_dict({**raw, "format_version": 99})


def test_corrupt_bundle_is_refused(bundle, tmp_path):
    req, _ = bundle
    copy = tmp_path / "copy"
    shutil.copytree(req.out, copy)
    data = copy / "onnx" / "decoder_post.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(LladaVError, match="decoder_post.onnx.data is corrupt"):
        verify_files(copy, read_manifest(copy))
    data.unlink()
    with pytest.raises(LladaVError, match="decoder_post.onnx.data is missing"):
        verify_files(copy, read_manifest(copy))


def test_rerun_reuses_and_k_change_reexports_only_decoders(bundle, tmp_path):
    req, _ = bundle
    out = tmp_path / "again"
    shutil.copytree(req.out, out)
    same = build_bundle(replace(req, out=out, p=70), log=quiet)
    assert same.reused == ["vision", "decoder_pre", "decoder_post", "similarity"] and same.exported == []
    first = read_manifest(req.out)
    for name, entry in same.manifest.subgraphs.items():  # reused graphs keep the tolerances their validation gave
        assert entry.tolerances == first.subgraphs[name].tolerances and entry.validation == first.subgraphs[name].validation
    assert same.manifest.p == 70 and same.manifest.profiles["axes"]["seq"][1] == 100 + 729 - 510 + 16
    assert "replaced one that differed: P 50 -> 70; profile (min, opt, max): seq (1, 481, 921) -> (1, 335, 921)" \
        in summary(same)  # a new P retunes the engines' opt shapes: said, not silent
    moved = build_bundle(replace(req, out=out, k=3), log=quiet)
    assert moved.reused == ["vision", "similarity"] and moved.exported == ["decoder_pre", "decoder_post"]
    verify_files(out, read_manifest(out))


@pytest.fixture
def interrupted(bundle, tmp_path, monkeypatch):
    """A copy of the bundle at tmp_path/kept, and every export interrupted as by Ctrl-C: (req, out, manifest text)."""
    req, _ = bundle
    out = tmp_path / "kept"
    shutil.copytree(req.out, out)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod.GraphExport, "run", ctrl_c)
    return req, out, (out / "manifest.json").read_text()


def test_interrupted_build_leaves_the_old_bundle(interrupted, tmp_path):
    req, out, before = interrupted
    with pytest.raises(KeyboardInterrupt):
        build_bundle(replace(req, out=out, k=7), log=quiet)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]  # no temporary directory left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        build_bundle(replace(req, out=fresh), log=quiet)
    assert not fresh.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--k", "0"], "K: got 0; expected an integer layer index in 1..31"),
        (["--k", "32"], "K: got 32"),
        (["--p", "100"], r"P: got 100.0; expected a percentage in [0, 100)"),
        (["--p", "-1"], "P: got -1.0"),
        (["--opt-text-tokens", "300"], "--opt-text-tokens=300, --max-text-tokens=256: expected 1 <= "
                                       "--opt-text-tokens <= --max-text-tokens"),
        (["--opt-block", "256"], "--opt-block=256, --max-response=128: expected 1 <= --opt-block <= --max-response"),
    ],
)
def test_bad_arguments_fail_before_heavy_work(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_dir), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_checkpoints_and_outputs(tiny_dir, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{")
    assert main(["--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "busy")]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "file" / "b")]) == 2  # under a file
    assert f"{str(tmp_path / 'file')!r} is a file; expected a directory above the output" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse then
            assert main(["--model", str(tiny_dir), "--out", str(locked / "b")]) == 2
            assert "is not writable; expected a place this user can write" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_a_bundle_of_another_model_is_replaced_only_with_force(bundle, tmp_path):
    """--out holding another model's bundle: refused before any export; with --force replaced, the
    summary says what changed, and none of the old model's tokenizer files survive."""
    from export.tiny import FAMILY, write_random

    req, _ = bundle
    out = tmp_path / "b"
    shutil.copytree(req.out, out)
    (out / "tokenizer" / "old-only.json").write_text("{}")  # a file only the old model's tokenizer had
    (out / "notes.txt").write_text("mine")
    other = write_random(tmp_path / "other", *FAMILY["family-narrow"])
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(LladaVError, match=r"holds a bundle of another model \('tiny'.*this build is of 'family-narrow'.*"
                                          r"--force to replace that bundle"):
        build_bundle(replace(req, model_dir=other, out=out, k=3), log=quiet)
    assert (out / "manifest.json").read_text() == manifest
    result = build_bundle(replace(req, model_dir=other, out=out, k=3, force=True), log=quiet)
    assert result.retuned.startswith("model tiny -> family-narrow; K 15 -> 3") and "replaced one that differed" in summary(result)
    assert not (out / "tokenizer" / "old-only.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert result.manifest.model["name"] == "family-narrow"


def test_the_model_name_is_the_checkpoints_not_its_config_file(tiny_dir, tmp_path):
    import json

    plain = tmp_path / "my-llada"
    shutil.copytree(tiny_dir, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["_name_or_path"]
    (plain / "config.json").write_text(json.dumps(cfg))
    from export.checkpoint import open_checkpoint

    assert open_checkpoint(plain).config.name == "my-llada"


def test_engine_reuse_needs_same_onnx_profile_and_tensorrt(bundle, tmp_path):
    from export.build import reusable_engine

    req, result = bundle
    old = read_manifest(req.out)
    old.tensorrt["version"] = "10.3.0"
    entry = old.subgraphs["decoder_pre"]
    settings = EngineBuildSettings("fp32")
    assert old.tensorrt["build_settings"] == settings.to_dict()  # recorded even where no engine was built
    assert reusable_engine(old, entry, replace(entry), "10.3.0", settings)
    assert not reusable_engine(old, entry, replace(entry), "10.7.0", settings)  # tied to the TensorRT version
    other_profile = replace(entry, shapes=[{**entry.shapes[0], "score_rows": {"min": [1], "opt": [9], "max": [99]}},
                                           entry.shapes[1]])
    assert not reusable_engine(old, entry, other_profile, "10.3.0", settings)
    assert not reusable_engine(old, entry, replace(entry, shapes=entry.shapes[:1]), "10.3.0", settings)  # no cached profile
    other_onnx = replace(entry, onnx=replace(entry.onnx, sha256="0" * 64))
    assert not reusable_engine(old, entry, other_onnx, "10.3.0", settings)
    assert not reusable_engine(old, entry, replace(entry), "10.3.0", replace(settings, tf32=True))  # built with TF32


def test_reuse_leaves_the_previous_manifest_untouched(bundle, tmp_path):
    """Reused ONNX entries are copies: the previous manifest keeps its shapes (and engines)."""
    from export.build import Builder
    from export.checkpoint import open_checkpoint

    req, _ = bundle
    ckpt = open_checkpoint(req.model_dir)
    b = Builder(replace(req, p=70), ckpt, quiet)
    before = b.old.subgraphs["decoder_pre"].shapes
    (tmp_path / "onnx").mkdir()
    from export.subgraphs import DECODER_PRE as spec

    entry = b.subgraph(tmp_path, spec)  # the ranges of P=70
    assert b.reused == ["decoder_pre"] and entry is not b.old.subgraphs["decoder_pre"]
    assert b.old.subgraphs["decoder_pre"].shapes == before != entry.shapes


class RecordingBuilderConfig:
    """Stands in for TensorRT's IBuilderConfig: records what is set on it (TensorRT is not imported)."""

    def __init__(self):
        self.calls = []

    def __setattr__(self, name, value):
        if name != "calls":
            self.calls.append(("set", name, value))
        object.__setattr__(self, name, value)

    def set_memory_pool_limit(self, pool, size):
        self.calls.append(("set_memory_pool_limit", pool, size))

    def clear_flag(self, flag):
        self.calls.append(("clear_flag", flag))


TRT_ENUMS = SimpleNamespace(  # TensorRT's enum members, by name
    BuilderFlag=SimpleNamespace(TF32="BuilderFlag.TF32"),
    ProfilingVerbosity=SimpleNamespace(DETAILED="ProfilingVerbosity.DETAILED", NONE="ProfilingVerbosity.NONE",
                                       LAYER_NAMES_ONLY="ProfilingVerbosity.LAYER_NAMES_ONLY"),
    MemoryPoolType=SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE"),
    NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
)


def configured(settings: EngineBuildSettings):
    config = RecordingBuilderConfig()
    settings.configure(TRT_ENUMS, config)
    return settings.network_flags(TRT_ENUMS), config.calls


def test_one_source_drives_the_builder_and_the_trtexec_command():
    """fp32 engines without TF32 (TensorRT's default on Ampere) in both paths; and every setting
    moves both the Python builder and the trtexec flags, so neither can silently ignore one."""
    flags, calls = configured(EngineBuildSettings("fp32"))
    assert ("clear_flag", "BuilderFlag.TF32") in calls and "--noTF32" in EngineBuildSettings("fp32").trtexec_flags()
    assert flags == 0 and "--stronglyTyped" not in EngineBuildSettings("fp32").trtexec_flags()
    flags, calls = configured(EngineBuildSettings("fp16"))
    assert flags == 1 and "--stronglyTyped" in EngineBuildSettings("fp16").trtexec_flags()
    assert ("set_memory_pool_limit", "MemoryPoolType.WORKSPACE", 4096 << 20) in calls
    assert ("set", "builder_optimization_level", 3) in calls
    assert ("set", "profiling_verbosity", "ProfilingVerbosity.DETAILED") in calls  # layer names for jetson/latency.py
    assert "--profilingVerbosity=detailed" in EngineBuildSettings("fp16").trtexec_flags()
    base = EngineBuildSettings("fp32")
    variants = {"precision": "fp16", "workspace_mib": 1024, "opt_level": 5, "tf32": True, "profiling_verbosity": "none"}
    assert set(variants) == set(base.to_dict())  # a new setting must be added here, and to both paths
    for field_name, value in variants.items():
        other = replace(base, **{field_name: value})
        assert other.trtexec_flags() != base.trtexec_flags(), field_name
        assert configured(other) != configured(base), field_name


@pytest.mark.parametrize("profile", [
    QUICK,
    ProfileSettings(layout="single", max_text_tokens=160, opt_text_tokens=100, max_response=16, opt_response=8),
    ProfileSettings(layout="single", max_response=4, opt_response=2, max_text_tokens=40, opt_text_tokens=30),
    ProfileSettings(max_batch=2),
    ProfileSettings(),
])
def test_engine_validation_shapes_lie_inside_the_profile(profile):
    """What the engine check feeds a freshly built engine must be inside its profile (issue 8: with one
    tile or a short --max-response the old fixed sizes were not, so every such GPU build failed its check)."""
    cfg = PRESETS["tiny"]
    for which, ranges in enumerate(profile_ranges(cfg, profile, 50)):  # the full and the cached-step profile
        axes_list = validation_axes(ranges)
        for spec in SUBGRAPHS:
            all_shapes = input_shapes(spec, cfg, profile_ranges(cfg, profile, 50), k=15)
            if which >= len(all_shapes):
                continue  # vision has the full profile only
            shapes = all_shapes[which]
            for i, axes in enumerate(axes_list):
                for name, x in dummy_inputs(spec, cfg, axes, "float32", seed=i, k=15).items():
                    lo, hi = shapes[name]["min"], shapes[name]["max"]
                    assert all(a <= d <= b for d, a, b in zip(x.shape, lo, hi)), (spec.name, name, x.shape, lo, hi)
        dynamic = [a for a, (lo, _, hi) in ranges.items() if lo < hi]
        assert all(axes_list[0][a] != axes_list[1][a] for a in dynamic)  # two sizes wherever the profile allows


def test_engines_required_fail_before_any_export(tiny_dir, tmp_path, capsys, monkeypatch):
    from export.trt_build import tensorrt_status

    usable, why, _ = tensorrt_status()
    if usable:
        pytest.skip("TensorRT and a GPU are present: the 'required' path succeeds here")

    def no_heavy_work(*a, **k):
        raise AssertionError("weights were loaded or a graph exported before the TensorRT check")

    monkeypatch.setattr(build_mod, "load_model", no_heavy_work)
    monkeypatch.setattr(build_mod.GraphExport, "run", no_heavy_work)
    out = tmp_path / "o"
    assert main(["--model", str(tiny_dir), "--out", str(out), "--engines", "require"]) == 2
    assert f"engines: required, but {why}" in capsys.readouterr().err and not out.exists()


def test_opset_is_exported_and_part_of_the_cache_key(bundle, tmp_path):
    import onnx

    req, _ = bundle
    out = tmp_path / "o17"
    shutil.copytree(req.out, out)
    result = build_bundle(replace(req, out=out, opset=17), log=quiet)
    assert result.exported == ["vision", "decoder_pre", "decoder_post", "similarity"] and result.manifest.opset == 17
    for e in result.manifest.subgraphs.values():
        model = onnx.load(str(out / e.onnx.path), load_external_data=False)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    with pytest.raises(LladaVError, match=r"opset: got 16; expected 17..20"):
        build_bundle(replace(req, out=tmp_path / "o16", opset=16), log=quiet)


def test_default_bundle_names_carry_k_p_and_precision(tiny_dir):
    from export.build_engines import parse_args, request

    assert request(parse_args(["--model", str(tiny_dir), "--p", "70"])).out.name == "tiny-k15-p70-fp16"
    assert request(parse_args(["--model", str(tiny_dir), "--k", "3", "--p", "12.5"])).out.name == "tiny-k3-p12.5-fp16"


def test_ctrl_c_prints_one_line_and_exits_130(interrupted, tmp_path, capsys):
    req, out, before = interrupted
    assert main(["--model", str(req.model_dir), "--out", str(out), "--k", "7", "--precision", "fp32"]) == 130
    assert capsys.readouterr().err == f"interrupted; nothing was written, the previous bundle {out} is intact\n"
    assert (out / "manifest.json").read_text() == before
    assert main(["--model", str(req.model_dir), "--out", str(tmp_path / "new"), "--precision", "fp32"]) == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n" and not (tmp_path / "new").exists()


def test_quantized_precisions_need_opset_19(tiny_dir, tmp_path):
    """int8 and int4 quantize fp16 graphs whose Q/DQ carry float16 scales (opset 19): an explicit lower
    opset is refused before any export."""
    for precision in ("int8", "int4"):
        with pytest.raises(LladaVError, match=rf"opset: got 18; expected 19..20 \({precision} Q/DQ with float16 scales "
                                              "needs opset 19\\)"):
            build_bundle(BuildRequest(tiny_dir, tmp_path / "o", 15, 50, precision, opset=18), log=quiet)
    assert not (tmp_path / "o").exists()


def run_jetson_script(bundle, tmp_path):
    """The bundle's jetson/build_engines.sh with a stand-in trtexec that writes a placeholder engine file
    (TensorRT does not run here): what the script leaves behind, engines and their records."""
    import subprocess

    stub = tmp_path / "trtexec-stand-in"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in --saveEngine=*) echo placeholder > "${a#--saveEngine=}";;'
                    ' esac; done\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(bundle / "jetson" / "build_engines.sh")], env={"TRTEXEC": str(stub),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_rebuild_keeps_what_it_did_not_write_and_reports_stale_engines(bundle, tmp_path):
    """Issue 9: a rebuild deleted engines/ (minutes of Jetson work) and a user's NOTES.txt."""
    from runtime.backends.trt import check_engines

    req, _ = bundle
    out = tmp_path / "b"
    shutil.copytree(req.out, out)
    run_jetson_script(out, tmp_path)
    (out / "NOTES.txt").write_text("mine")
    engines = {n: out / "engines" / f"{n}.engine" for n in ("vision", "decoder_pre", "decoder_post", "similarity")}
    record = json.loads((out / "engines" / "decoder_pre.engine.json").read_text())
    assert record["onnx_sha256"] == read_manifest(out).subgraphs["decoder_pre"].onnx.sha256
    check_engines(out, read_manifest(out), record["tensorrt"])  # fresh: no error
    with pytest.raises(LladaVError, match=r"vision.engine is stale \(changed since it was built: TensorRT version "
                                          r"\(unknown; this host has 10.99.0\)\); build the engines on this device"):
        check_engines(out, read_manifest(out), "10.99.0")

    same = build_bundle(replace(req, out=out), log=quiet)  # the same bundle again
    assert same.stale == [] and all(e.is_file() for e in engines.values()) and (out / "NOTES.txt").read_text() == "mine"
    retuned = build_bundle(replace(req, out=out, p=70), log=quiet)  # another P: the decoders' opt shapes change
    assert retuned.stale == [f"engines/{n}.engine is stale (changed since it was built: profile): kept; rebuild it "
                             "with jetson/build_engines.sh, or --clean deletes it" for n in ("decoder_post", "decoder_pre")]
    moved = build_bundle(replace(req, out=out, k=3), log=quiet)  # new decoders: their engines are stale
    assert [n.split(" ")[0] for n in moved.stale] == ["engines/decoder_post.engine", "engines/decoder_pre.engine"]
    # the K/V inputs hold one row per layer of the half: K's change is in the profile too
    assert moved.stale[1] == ("engines/decoder_pre.engine is stale (changed since it was built: ONNX graph, ONNX "
                              "weights, profile): kept; rebuild it with jetson/build_engines.sh, or --clean deletes it")
    assert all(e.is_file() for e in engines.values()) and (out / "NOTES.txt").read_text() == "mine"
    assert "engines/decoder_pre.engine is stale" in summary(moved)
    with pytest.raises(LladaVError, match=r"engines/decoder_pre.engine is stale \(changed since it was built: ONNX"):
        check_engines(out, read_manifest(out), record["tensorrt"])  # never silently used

    cleaned = build_bundle(replace(req, out=out, k=3, clean=True), log=quiet)
    assert all("deleted (--clean)" in n for n in cleaned.stale) and len(cleaned.stale) == 2
    assert not engines["decoder_pre"].exists() and not (out / "engines" / "decoder_pre.engine.json").exists()
    assert engines["vision"].is_file() and (out / "NOTES.txt").read_text() == "mine"
    (out / "engines" / "vision.engine.json").unlink()
    with pytest.raises(LladaVError, match=r"vision.engine is of unknown origin"):
        check_engines(out, read_manifest(out), record["tensorrt"])


def test_a_second_build_into_the_same_output_is_refused_while_the_first_runs(bundle, tmp_path):
    """Two builds into one --out both said "bundle written" and the last rename won; now the second is
    refused with the first one's pid (the lock is flock's: a crashed build leaves nothing held)."""
    from runtime.files import output_lock

    req, _ = bundle
    out = tmp_path / "b"
    with output_lock(out, "out"):  # as a first build would hold it
        with pytest.raises(LladaVError, match=rf"out '{out}': another process \(pid {os.getpid()}\) is writing it now"):
            build_bundle(replace(req, out=out), log=quiet)
    assert not out.exists()
    assert build_bundle(replace(req, out=out), log=quiet).manifest.k == 15  # released: the next build runs


def test_check_output_dir_refuses_each_unusable_target(tmp_path, monkeypatch):
    """runtime.files.check_output_dir, the one check every writing command runs first. This suite runs as
    root, which writes anywhere: the unwritable case is taken from os.access."""
    from runtime.files import check_output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(LladaVError, match=r"--out '.*f': is a file; expected a directory"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(LladaVError, match=r"is a file; expected a directory above the output"):
        check_output_dir(tmp_path / "f" / "deeper" / "out", "--out")
    assert check_output_dir(tmp_path / "new" / "out", "--out") == tmp_path / "new" / "out"  # created later
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(LladaVError, match=rf"--out '.*out': '{tmp_path}' is not writable; expected a place this user"):
        check_output_dir(tmp_path / "out", "--out")
